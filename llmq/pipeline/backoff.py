"""Exponential backoff: for loop boundaries that wait out a failing dependency, and for message retries."""

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


def retry_delay(
    attempt: int,
    *,
    initial_s: float,
    factor: float,
    max_s: float,
    retry_after_s: float | None = None,
    jitter: float = 0.2,
    rand: float | None = None,
) -> float:
    """Seconds before retry number ``attempt`` (1 for the first retry): ``initial × factor^(attempt-1)``
    capped at ``max_s``, then shortened by up to ``jitter`` (a fraction) so that retries of messages that
    failed together spread out. A backend's Retry-After wins when it is longer."""
    base = min(max_s, initial_s * factor ** max(0, attempt - 1))
    r = random.random() if rand is None else rand
    delay = base * (1 - jitter * r)
    if retry_after_s is not None and retry_after_s > delay:
        return retry_after_s
    return delay
