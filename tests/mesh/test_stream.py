"""The msgpack stream's frame codec: frames split and joined arbitrarily come out whole."""

from __future__ import annotations

import pytest

from mesh.errors import PayloadTooLarge
from mesh.stream import ANSWER, INFER, FrameReader, frame


def test_frames_split_anywhere_are_reassembled_in_order() -> None:
    stream = frame(1, INFER, b"first") + frame(7, ANSWER, b"") + frame(2**32 - 1, INFER, b"x" * 1000)
    for step in (1, 3, 9, 64, len(stream)):
        reader = FrameReader()
        got = []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i:i + step])
        assert got == [(1, INFER, b"first"), (7, ANSWER, b""), (2**32 - 1, INFER, b"x" * 1000)]


def test_an_oversized_frame_is_refused_before_it_is_buffered() -> None:
    reader = FrameReader(max_frame=100)
    with pytest.raises(PayloadTooLarge, match="at most 100"):
        reader.feed(frame(1, INFER, b"y" * 101)[:20])
