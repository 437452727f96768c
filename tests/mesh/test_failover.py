"""The SDK's failover rules (mesh.failover), driven with explicit times: which entry a query
tries next, how long each attempt may wait, and which error is left when none answered."""

from __future__ import annotations

import pytest

from mesh import AsyncClient, Client
from mesh.errors import ClientError, MeshConnectionError, MeshTimeout
from mesh.failover import Failover, Timeouts, rotate_past
from mesh.wire import SLO

T = Timeouts(total_s=30.0, connect_s=1.0, attempt_s=5.0, min_attempt_s=0.5)


def _attempts(failover: Failover, times: list[float]) -> list[tuple[int, float, bool]]:
    out = []
    for now in times:
        attempt = failover.next(now)
        if attempt is None:
            break
        out.append((attempt.index, round(attempt.timeout_s, 6), attempt.last))
        failover.failed(MeshTimeout(f"no answer from entry {attempt.index}"))
    return out


def test_every_entry_is_tried_once_from_the_preferred_one_and_the_last_gets_the_rest() -> None:
    failover = Failover(3, 1, SLO(), T, started=100.0)
    # without a latency target: 5 s each while others are left, then all that remains
    assert _attempts(failover, [100.0, 105.0, 110.0, 111.0]) == [
        (1, 5.0, False), (2, 5.0, False), (0, 20.0, True)]
    assert failover.next(111.0) is None


def test_a_latency_target_sets_the_attempt_timeout_with_a_floor() -> None:
    failover = Failover(3, 0, SLO(latency_ms=2000), T, started=0.0)
    first = failover.next(0.1)
    assert first is not None and first.timeout_s == pytest.approx(1.9)  # what is left of 2 s
    assert first.timeout_ms == pytest.approx(1900.0)  # what the query carries
    second = failover.next(2.5)
    assert second is not None and second.timeout_s == 0.5  # the budget is spent: the floor
    tight = Failover(2, 0, SLO(latency_ms=10), T, started=0.0).next(0.0)
    assert tight is not None and tight.timeout_s == 0.5
    offline = Failover(2, 0, SLO(latency_ms=10, offline=True), T, started=0.0).next(0.0)
    assert offline is not None and offline.timeout_s == 5.0  # latency does not matter offline
    slow_ok = Failover(2, 0, SLO(latency_ms=20_000), T, started=0.0).next(0.0)
    assert slow_ok is not None and slow_ok.timeout_s == 20.0  # the caller said 20 s is fine


def test_no_attempt_outlives_the_query_deadline() -> None:
    failover = Failover(3, 0, SLO(), T, started=0.0)
    late = failover.next(28.0)
    assert late is not None
    assert (late.timeout_s, late.connect_s) == (2.0, 1.0)
    assert late.answer_timeout(29.5) == 0.5  # sent late after connecting: only what is left
    assert failover.next(30.0) is None  # deadline passed: the third entry is never tried
    failover.failed(MeshTimeout("no answer from http://a"))
    error = failover.error()
    assert isinstance(error, MeshTimeout)
    assert "30 s timeout passed before 2 more entry node(s) could be tried" in error.message


def test_the_error_left_names_every_attempt_and_says_timeout_only_when_one_timed_out() -> None:
    refused = MeshConnectionError("cannot reach entry node http://a: refused")
    silent = MeshTimeout("no answer from tcp://b within 5 s")
    one = Failover(1, 0, SLO(), T, started=0.0)
    assert one.next(0.0) is not None
    one.failed(refused)
    assert one.error() is refused  # a single entry: its own error, unchanged

    both_refused = Failover(2, 0, SLO(), T, started=0.0)
    for _ in range(2):
        assert both_refused.next(0.0) is not None
        both_refused.failed(refused)
    assert type(both_refused.error()) is MeshConnectionError

    mixed = Failover(2, 0, SLO(), T, started=0.0)
    for error in (refused, silent):
        assert mixed.next(0.0) is not None
        mixed.failed(error)
    got = mixed.error()
    assert isinstance(got, MeshTimeout) and isinstance(got, TimeoutError)
    assert got.message == ("cannot reach entry node http://a: refused; "
                           "no answer from tcp://b within 5 s")


def test_later_queries_start_past_a_failed_entry_unless_another_query_moved_on() -> None:
    assert rotate_past(0, 0, 3) == 1
    assert rotate_past(2, 2, 3) == 0
    assert rotate_past(1, 0, 3) == 1  # a concurrent query already moved past entry 0


@pytest.mark.parametrize("kwargs, named", [
    ({"timeout_s": 0}, "timeout_s"),
    ({"connect_timeout_s": -1}, "connect_timeout_s"),
    ({"attempt_timeout_s": float("nan")}, "attempt_timeout_s"),
    ({"attempt_timeout_s": "5"}, "attempt_timeout_s"),
    ({"timeout_s": 7200}, "timeout_s"),
])
def test_bad_timeouts_are_refused_when_the_client_is_made(kwargs: dict, named: str) -> None:
    for cls in (Client, AsyncClient):
        with pytest.raises(ClientError, match=f"^{named}: must be a number of seconds"):
            cls("http://127.0.0.1:1", **kwargs)
