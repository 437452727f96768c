"""Node processes for integration tests: started together, always stopped (SIGTERM, then
SIGKILL), each with its own log; and a bounded wait for a condition."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["running", "until"]


@contextlib.contextmanager
def running(commands: Mapping[str, Sequence[str]], logs: Path) -> Iterator[None]:
    """Start one process per ``commands`` entry (its output in ``logs/NAME.log``)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, argv in commands.items():
            with open(logs / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def until(condition: Callable[[], Any], what: str, timeout_s: float = 90.0) -> None:
    """Wait until ``condition()`` is true (errors count as not yet); fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception as exc:  # noqa: BLE001 - not up yet; said at the end
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s} s: {what} (last error: {last})")
