"""The SDK's failover and retry rules (mesh.failover), driven with explicit times and draws:
which entry a query tries next, after what pause, how long each attempt may wait, what the
retry budget allows, and which error is left when none answered."""

from __future__ import annotations

import random

import pytest

from mesh import AsyncClient, Client
from mesh.errors import (
    CannotMeetDeadline,
    ClientError,
    Forbidden,
    InvalidInput,
    MeshConnectionError,
    MeshTimeout,
    Overloaded,
    UnknownTask,
)
from mesh.failover import Attempt, Failover, RetryBudget, RetryPolicy, Timeouts, rotate_past
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


# --------------------------------------------------------------------------- retries


class Draws(random.Random):
    """A random source whose every draw is ``share`` of the way up: jitter made visible."""

    def __init__(self, share: float) -> None:
        super().__init__(0)
        self.share = share

    def random(self) -> float:
        return self.share


BUSY = Overloaded("edge-1: queue full")


def _retrying(entries: int = 1, *, share: float = 1.0, total_s: float = 30.0,
              budget: RetryBudget | None = None, **policy: object) -> Failover:
    return Failover(entries, 0, SLO(), Timeouts(total_s=total_s), started=0.0,
                    policy=RetryPolicy(**policy), budget=budget, rng=Draws(share))  # type: ignore[arg-type]


def test_a_busy_answer_is_retried_after_exponential_backoff_with_full_jitter() -> None:
    for share in (1.0, 0.5, 0.0):
        failover = _retrying(share=share)
        delays = []
        while (attempt := failover.next(10.0)) is not None:
            delays.append(attempt.delay_s)
            failover.failed(BUSY, 10.0)
        # the first attempt at once, then uniform in [0, 50 ms], [0, 100 ms]; 3 attempts
        assert delays == pytest.approx([0.0, 0.05 * share, 0.1 * share])
        error = failover.error()
        assert isinstance(error, Overloaded)  # the mesh's own word, so `except Overloaded` works
        assert error.message == ("edge-1: queue full; edge-1: queue full; edge-1: queue full; "
                                 "gave up after 3 attempt(s) (retry.max_attempts)")
    ceilings = RetryPolicy(initial_backoff_s=0.1, multiplier=3, max_backoff_s=0.5)
    assert [ceilings.backoff_ceiling_s(n) for n in range(4)] == pytest.approx([0.1, 0.3, 0.5, 0.5])


def test_another_entry_is_tried_first_and_an_unreachable_one_never_again() -> None:
    failover = _retrying(3, share=1.0, max_attempts=5)
    first = failover.next(0.0)
    assert first is not None and first.index == 0
    failover.failed(MeshConnectionError("cannot reach entry node http://a"), 0.0)
    second = failover.next(0.0)
    # an entry that could not be reached got no load: on to an untried one at once
    assert second is not None and (second.index, second.delay_s) == (1, 0.0)
    failover.failed(BUSY, 0.1)
    third = failover.next(0.1)
    # after a busy answer: backoff, and still an entry not tried yet
    assert third is not None and (third.index, third.delay_s) == (2, pytest.approx(0.05))
    failover.failed(MeshTimeout("no answer from http://c"), 1.0)
    # the busy one is tried again; the unreachable and the frozen one never are
    assert [a.index for a in iter(lambda: _fail_busy(failover), None)] == [1, 1]
    assert failover.attempts == 5


def _fail_busy(failover: Failover) -> Attempt | None:
    attempt = failover.next(2.0)
    if attempt is not None:
        failover.failed(BUSY, 2.0)
    return attempt


def test_retry_after_is_honoured_and_a_wait_past_the_deadline_is_not_retried() -> None:
    failover = _retrying(2, share=0.0)
    assert failover.next(1.0) is not None
    failover.failed(Overloaded("queue full", retry_after_s=2.0), 1.0)
    later = failover.next(1.0)
    # never sooner than it said, on whichever entry (they all route into one mesh)
    assert later is not None and later.index == 1 and later.delay_s == pytest.approx(2.0)
    assert later.timeout_s == pytest.approx(27.0)  # the last entry: all that is left

    short = _retrying(1, total_s=3.0)
    assert short.next(0.0) is not None
    short.failed(CannotMeetDeadline("nothing meets 10 ms now", retry_after_s=5.0), 0.5)
    assert short.next(0.5) is None
    error = short.error()
    assert isinstance(error, CannotMeetDeadline) and error.retry_after_s == 5.0
    assert error.message == ("nothing meets 10 ms now; not retried: the mesh asked to wait 5 s, "
                             "longer than the 2.5 s left of the query's 3 s timeout")


def test_errors_the_caller_must_fix_are_not_retried() -> None:
    for error in (InvalidInput("tensors[0]: bad"), UnknownTask("task 'x' is not registered"),
                  Forbidden("no")):
        failover = _retrying(2)
        assert failover.next(0.0) is not None
        failover.failed(error, 0.0)
        assert failover.next(0.0) is None
        assert failover.error() is error


def test_the_retry_budget_keeps_retries_to_a_fifth_of_queries_plus_a_reserve() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=3, window_s=10.0)
    for t in range(10):
        budget.started(float(t) / 10)
    allowed = 0
    while budget.can_retry(1.0):
        budget.retried(1.0)
        allowed += 1
    assert allowed == 5  # 3 + 20% of 10
    assert budget.counts(9.9) == (10, 5)
    assert budget.counts(11.05) == (0, 0)  # the window slid past them
    assert budget.can_retry(11.05)

    spent = RetryBudget(ratio=0.2, min_retries=0, window_s=10.0)
    failover = _retrying(2, budget=spent)
    assert failover.next(0.0) is not None  # 1 query: 0.2 retries allowed, so the 1st is
    failover.failed(BUSY, 0.0)
    assert failover.next(0.0) is not None
    failover.failed(BUSY, 0.0)
    assert failover.next(0.0) is None  # ... and a 2nd is not
    assert "retry budget is spent (retries are kept to 20% of its queries over 10 s, plus 0)" \
        in failover.error().message


def test_the_same_rules_hold_for_both_clients_policy_errors_named() -> None:
    for bad, named in (({"max_attempts": 0}, "retry.max_attempts"),
                       ({"budget_ratio": 2}, "retry.budget_ratio"),
                       ({"initial_backoff_s": -1}, "retry.initial_backoff_s")):
        with pytest.raises(ClientError, match=f"^{named}: must be"):
            RetryPolicy(**bad)  # type: ignore[arg-type]
    for cls in (Client, AsyncClient):
        with pytest.raises(ClientError, match="^retry: a mesh.RetryPolicy"):
            cls("http://127.0.0.1:1", retry=3)  # type: ignore[arg-type]
        assert cls("http://127.0.0.1:1").retry == RetryPolicy()


def test_failing_over_from_an_unreachable_entry_draws_nothing_from_the_budget() -> None:
    empty = RetryBudget(ratio=0.0, min_retries=0, window_s=10.0)
    failover = _retrying(3, budget=empty)
    assert failover.next(0.0) is not None
    failover.failed(MeshConnectionError("cannot reach entry node http://a: refused"), 0.0)
    second = failover.next(0.0)
    assert second is not None and second.index == 1  # it reached nothing: failover is free
    failover.failed(MeshTimeout("no answer from http://b within 5 s"), 5.0)
    assert failover.next(5.0) is None  # a timeout's retry may add load: it is rationed
    assert empty.counts(5.0) == (1, 0)
    assert "retry budget is spent" in failover.error().message
