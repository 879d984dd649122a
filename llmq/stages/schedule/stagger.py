"""Staggered admission: the calls of the lower levels do not all start, and so end, together.

Calls that start together end together when a backend takes a regular time. Then every slot frees in one
wave per call duration, each wave is refilled at once, and the pattern lasts as long as the backlog does:
the queue's own batching merges slots that end a few milliseconds apart and nothing splits them again.
An urgent message that finds every slot busy then waits for the next wave, up to a whole call, where it
would wait about call duration / slots with the ends spread out. (Measured with three backends of 4
slots and 200 ms calls: waves 170-190 ms apart, and realtime queue-wait p99 160-170 ms.)

So while a backlog waits and calls take a regular time, the admissions of every level but the urgent
ones (the top priority, and any level with reserved slots) are spaced ``SPREAD × call duration / slots``
apart. A wave is then refilled over most of a call instead of at once; after one call duration the
ends are spread, and refilling each slot as it frees keeps them spread, so the spacing costs nothing more
until the pattern drifts. While call durations vary by more than the spacing (their interquartile range),
they spread the ends by themselves and spacing would only leave slots idle, so there is none. (Half the
spacing was too strict: a loaded scheduler host alone made calls of a fixed 100 ms vary by that much.)

Without a backlog nothing is held back: nothing would refill a wave later.

Pure state and arithmetic, no Redis: the scheduler feeds it call durations and asks for the spacing.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Collection, Sequence

SPREAD = 0.9
"""Fraction of the even spacing (duration / slots) kept between staggered admissions. Below 1 so that
refilling slots that already end evenly apart is never held back: a slot's cycle is its call plus the
refill's few milliseconds."""
WINDOW = 16
"""How many of the latest calls the estimates look at."""
MIN_CALLS = 4
"""Calls that must have ended before there is any spacing: a median and quartiles of fewer say little."""
MIN_SPACING_S = 0.001
"""No spacing below this: an admission round takes about that long, so it could not keep a shorter one,
and one staggered admission per round would only slow a fast backlog down."""


class Stagger:
    """How long admitted messages hold their slots, over the latest ``WINDOW`` calls: the median, and the
    interquartile range as their spread, so that one slow call (a new connection, a pause) neither moves
    the spacing nor turns it off."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        """Slots the staggered levels share: the capacity less every level's reserved slots."""
        self._held: deque[float] = deque(maxlen=WINDOW)

    def observe(self, held_s: float) -> None:
        """One message held its slot ``held_s`` seconds (admission to finish)."""
        self._held.append(held_s)

    def interval_s(self) -> float:
        """Seconds between two staggered admissions; 0 (none) before ``MIN_CALLS`` calls ended, while their
        durations spread over more than that, or when it would be under ``MIN_SPACING_S``."""
        if len(self._held) < MIN_CALLS or self.slots <= 0:
            return 0.0
        q1, median, q3 = statistics.quantiles(self._held, n=4, method="inclusive")
        spacing = SPREAD * median / self.slots
        return spacing if spacing >= MIN_SPACING_S and q3 - q1 < spacing else 0.0


def stagger(order: Sequence[str], staggered: Collection[str], budget: int) -> list[str]:
    """The admission ``order`` with at most ``budget`` picks of the ``staggered`` levels left in it."""
    kept: list[str] = []
    for name in order:
        if name in staggered:
            if budget <= 0:
                continue
            budget -= 1
        kept.append(name)
    return kept
