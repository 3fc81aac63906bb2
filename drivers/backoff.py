"""Capped exponential backoff with jitter, for every reconnect loop (devices and broker).

Jitter keeps a ward's worth of devices (or gateways) from reconnecting to a
restarted broker in lock-step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        """Delay before the next attempt: uniform in [ceiling/2, ceiling], ceiling capped."""
        ceiling = min(self.max_s, self.initial_s * (self.factor**self.attempts))
        self.attempts += 1
        return ceiling / 2 + self.rng.random() * ceiling / 2

    def reset(self) -> None:
        self.attempts = 0
