"""Capped exponential backoff with jitter, for every reconnect loop (devices and broker).

Jitter keeps a ward's worth of devices (or gateways) from reconnecting to a
restarted broker in lock-step. It is "equal jitter": each delay is half the
current ceiling plus a uniform random part of up to the other half (never
"full jitter", which could retry at once).

The cap is in the arithmetic, not only in the result: the exponent stops
growing once the ceiling has reached ``max_s``, so a loop may fail forever (a
port missing for months, a device refused on every connect) without the
power ever overflowing a float. Before that was so, attempt 1,024 raised
``OverflowError`` (``2.0 ** 1024``) and took the whole gateway down.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    #: Steps taken up the exponential; stops at the step that reaches ``max_s``.
    attempts: int = 0
    _max_steps: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        for name in ("initial_s", "max_s", "factor"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"backoff {name} must be a finite positive number, not {value!r}")
        if self.initial_s > self.max_s:
            raise ValueError("backoff initial_s must not exceed max_s")
        if self.factor < 1:
            raise ValueError("backoff factor must be at least 1")
        ratio = self.max_s / self.initial_s
        self._max_steps = (
            0 if self.factor == 1 or ratio <= 1 else math.ceil(math.log(ratio, self.factor))
        )

    def ceiling(self) -> float:
        """The current upper bound of a delay (``initial_s`` growing to ``max_s``)."""
        steps = min(self.attempts, self._max_steps)
        return min(self.max_s, self.initial_s * self.factor**steps)

    def next_delay(self) -> float:
        """Delay before the next attempt: uniform in [ceiling/2, ceiling], ceiling capped."""
        ceiling = self.ceiling()
        if self.attempts < self._max_steps:
            self.attempts += 1
        return ceiling / 2 + self.rng.random() * ceiling / 2

    def reset(self) -> None:
        self.attempts = 0
