"""Capped exponential backoff with full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """``delay(n)`` is uniform in [0, min(cap, base * 2**n)] (AWS' "full jitter")."""

    base: float = 0.1
    cap: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.cap, self.base * (2 ** min(attempt, 32))))
