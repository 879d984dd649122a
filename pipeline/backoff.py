"""Exponential backoff with full jitter, for loop boundaries that wait out a failing dependency."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` returns the next delay: a random value up to initial × 2^n, capped at ``max_s``."""

    def __init__(self, *, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._n = 0

    def next(self) -> float:
        ceiling = min(self.max_s, self.initial_s * 2**self._n)
        self._n = min(self._n + 1, 32)
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._n = 0
