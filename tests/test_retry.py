"""The one retry policy (livekit_proctor.retry) that the dispatcher, the agent and the consumers share."""

from __future__ import annotations

import pytest

from livekit_proctor.retry import DISPATCH, RECONNECT, RetryPolicy


def test_delays_grow_by_the_factor_up_to_the_cap() -> None:
    p = RetryPolicy(first_s=0.1, max_s=60.0, factor=4.0, jitter=0.0, max_attempts=5)
    assert [round(p.delay(n), 3) for n in range(1, 8)] == [0.1, 0.4, 1.6, 6.4, 25.6, 60.0, 60.0]
    assert p.delay(10**9) == 60.0  # no overflow however long a peer stays down
    assert not p.exhausted(4) and p.exhausted(5)
    assert not RetryPolicy().exhausted(10**6)  # no max_attempts: a reconnect loop retries forever


def test_jitter_stays_within_its_bounds() -> None:
    for attempt in (1, 3, 50):
        base = RECONNECT.base_delay(attempt)
        for _ in range(200):
            assert base * 0.8 <= RECONNECT.delay(attempt) <= base * 1.2


def test_a_backoff_resets_after_a_success() -> None:
    b = RetryPolicy(first_s=1.0, max_s=8.0, jitter=0.0).backoff()
    assert [b.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    b.reset()
    assert b.next_delay() == 1.0


def test_the_dispatch_policy_is_the_documented_one() -> None:
    # docs/delivery.md: 100 ms, 400 ms, 1.6 s, 6.4 s, ... at most 60 s; PROCTOR_DISPATCH_MAX_ATTEMPTS (5).
    assert (DISPATCH.first_s, DISPATCH.factor, DISPATCH.max_s, DISPATCH.max_attempts) == (0.1, 4.0, 60.0, 5)


@pytest.mark.parametrize(
    "bad", [{"first_s": -1}, {"first_s": 5, "max_s": 1}, {"factor": 0.5}, {"jitter": 1.0}, {"max_attempts": 0}]
)
def test_nonsense_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**bad)  # type: ignore[arg-type]
