"""Backoff: capped in its arithmetic, so a loop can fail forever (issue 14 item 1)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.backoff import Backoff


def test_a_million_failures_never_overflow() -> None:
    """Attempt 1,024 used to raise OverflowError (2.0 ** 1024) and end the daemon."""
    b = Backoff(0.5, 30.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(1_000_000)]
    assert all(15.0 <= d <= 30.0 for d in delays[10:])
    assert b.attempts == 6  # the exponent stops at the step that reaches max_s
    assert b.ceiling() == 30.0


def test_grows_then_caps_and_resets() -> None:
    b = Backoff(0.5, 30.0, rng=random.Random(2))
    ceilings = []
    for _ in range(10):
        ceilings.append(b.ceiling())
        b.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    b.reset()
    assert b.ceiling() == 0.5


@given(
    initial=st.floats(1e-6, 1e3),
    ratio=st.floats(1.0, 1e9),
    factor=st.floats(1.0, 10.0),
    calls=st.integers(0, 3000),
)
def test_every_delay_is_within_the_cap(
    initial: float, ratio: float, factor: float, calls: int
) -> None:
    b = Backoff(initial, initial * ratio, factor, rng=random.Random(0))
    for _ in range(calls):
        b.next_delay()
    d = b.next_delay()
    assert initial / 2 <= d <= b.max_s


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_s": 0.0},
        {"initial_s": float("nan")},
        {"max_s": float("inf")},
        {"initial_s": 10.0, "max_s": 1.0},
        {"factor": 0.5},
    ],
)
def test_nonsense_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**kwargs)  # type: ignore[arg-type]
