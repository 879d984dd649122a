"""Admission: which waiting messages take the free in-flight slots next. Pure functions, no Redis.

Every strategy obeys the same limits: a level never exceeds its ``max_concurrent``, the total never
exceeds the capacity of the backends, and a level may not take the slots reserved (``reserved``) for
higher-priority levels that are not using them. Within those limits:

- ``priority_based``: strict priority by level, with aging — a message waiting longer than its level's
  ``max_wait_time`` goes ahead of fresher messages of higher levels, so low never starves.
- ``weighted``: smooth weighted round robin over the levels that have work (nginx's algorithm).
- ``deadline``: earliest ``enqueued_at + max_wait_time`` first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LevelView:
    """One level as admission sees it at one instant."""

    name: str
    priority: int
    max_wait_s: float
    weight: int
    free: int
    """max_concurrent minus in-flight."""
    reserved_unused: int
    """Slots reserved for this level that it is not using (reserved minus in-flight, at least 0)."""


def select(
    heads: Mapping[str, Sequence[float]],
    levels: Sequence[LevelView],
    free_total: int,
    now: float,
    strategy: str,
    wrr: dict[str, int] | None = None,
) -> list[str]:
    """Return level names in admission order, one per slot to fill.

    ``heads[level]`` holds the ``enqueued_at`` times of that level's waiting messages, oldest first
    (admission within a level is FIFO). ``wrr`` is the weighted round robin's state, kept by the caller
    between calls.
    """
    taken = {lv.name: 0 for lv in levels}
    free = {lv.name: lv.free for lv in levels}
    reserved = {lv.name: lv.reserved_unused for lv in levels}
    wrr = {} if wrr is None else wrr
    order: list[str] = []
    total = free_total
    while total > 0:
        eligible = []
        for lv in levels:
            waiting = heads.get(lv.name, ())
            if taken[lv.name] >= len(waiting) or free[lv.name] <= 0:
                continue
            above = sum(reserved[h.name] for h in levels if h.priority < lv.priority)
            if total - 1 < above:
                continue
            eligible.append(lv)
        if not eligible:
            break
        pick = _pick(eligible, heads, taken, now, strategy, wrr)
        order.append(pick)
        taken[pick] += 1
        free[pick] -= 1
        reserved[pick] = max(0, reserved[pick] - 1)
        total -= 1
    return order


def _pick(
    eligible: list[LevelView],
    heads: Mapping[str, Sequence[float]],
    taken: Mapping[str, int],
    now: float,
    strategy: str,
    wrr: dict[str, int],
) -> str:
    def head(lv: LevelView) -> float:
        return heads[lv.name][taken[lv.name]]

    if strategy == "deadline":
        return min(eligible, key=lambda lv: (head(lv) + lv.max_wait_s, lv.priority)).name
    if strategy == "weighted":
        total_weight = sum(lv.weight for lv in eligible)
        for lv in eligible:
            wrr[lv.name] = wrr.get(lv.name, 0) + lv.weight
        best = max(eligible, key=lambda lv: (wrr[lv.name], -lv.priority))
        wrr[best.name] -= total_weight
        return best.name
    # priority_based with aging: overdue first (highest priority among them), then by priority.
    return min(eligible, key=lambda lv: (now - head(lv) <= lv.max_wait_s, lv.priority, head(lv))).name
