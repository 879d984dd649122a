"""Tenants' fair shares of a level: start-time fair queueing (Goyal et al., SIGCOMM '96) by estimated tokens.

Each tenant of a level has a virtual time: the estimated tokens (``llmq.pipeline.tokens``) divided by its
weight of every message admitted for it. The next message a level admits is the oldest one of the tenant
whose next start is lowest, a start being the tenant's virtual time, or the level's (the start of its latest
admission) when that is later: a tenant new to the level, or back after a pause, starts level with the
others and brings no credit for the time it sent nothing. While tenants wait together, each gets tokens in
proportion to its weight whatever the number of messages it sends; alone, a tenant takes every slot.

The virtual times live in Redis (``Keys.tenant_vtime``, ``Keys.level_vtime``), moved by the admission script
with each admission, so every scheduler process orders by the same account. A tenant's expires once it has
been idle ``VTIME_TTL_S``. Within a tenant messages go in the order they were read (first in, first out).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmq.stages.schedule.arbiter import Candidate

VTIME_TTL_S = 600
"""How long a tenant's virtual time is remembered while it sends nothing: past it, it starts level again."""


class LevelQueue:
    """The messages of one level a scheduler holds, waiting: one queue per tenant, in the order read."""

    __slots__ = ("_deadline", "_size", "tenants")

    def __init__(self) -> None:
        self.tenants: dict[str | None, deque[Candidate]] = {}
        self._size = 0
        self._deadline = math.inf
        """The earliest deadline among the messages held (inf: none has one)."""

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Candidate]:
        for queue in self.tenants.values():
            yield from queue

    def extend(self, candidates: Sequence[Candidate]) -> None:
        for cand in candidates:
            self.tenants.setdefault(cand.message.tenant, deque()).append(cand)
            if cand.message.deadline is not None:
                self._deadline = min(self._deadline, cand.message.deadline)
        self._size += len(candidates)

    def remove(self, cand: Candidate) -> None:
        """Forget a decided candidate (the head of its tenant's queue, as ``order`` gives them)."""
        queue = self.tenants.get(cand.message.tenant)
        if not queue:
            return  # given back meanwhile (shutting down)
        if queue[0] is cand:
            queue.popleft()
        else:
            try:
                queue.remove(cand)
            except ValueError:
                return
        self._size -= 1
        if not queue:
            del self.tenants[cand.message.tenant]

    def clear(self) -> None:
        self.tenants.clear()
        self._size = 0
        self._deadline = math.inf

    def overdue(self, now: float) -> list[Candidate]:
        """Remove and return the messages whose deadline has passed."""
        if now < self._deadline:
            return []
        gone: list[Candidate] = []
        self._deadline = math.inf
        for tenant in list(self.tenants):
            kept: deque[Candidate] = deque()
            for cand in self.tenants[tenant]:
                deadline = cand.message.deadline
                if deadline is not None and deadline < now:
                    gone.append(cand)
                else:
                    kept.append(cand)
                    if deadline is not None:
                        self._deadline = min(self._deadline, deadline)
            if kept:
                self.tenants[tenant] = kept
            else:
                del self.tenants[tenant]
        self._size -= len(gone)
        return gone

    def order(
        self, k: int, level_vtime: float, vtimes: dict[str | None, float], room: dict[str | None, int] | None = None
    ) -> list[Candidate]:
        """The first ``k`` messages in the order they are to be admitted: by each tenant's next start
        (``vtimes``, missing ones at ``level_vtime``), then by arrival. A tenant in ``room`` (those with a
        max_in_flight) gives no more than its room there, which is taken as it gives them."""
        if k <= 0:
            return []
        room = {} if room is None else room
        if len(self.tenants) == 1 and not room:
            (queue,) = self.tenants.values()
            return [queue[i] for i in range(min(k, len(queue)))]
        heap: list[tuple[float, float, int, str | None]] = []
        taken: dict[str | None, int] = {}
        for seq, (tenant, queue) in enumerate(self.tenants.items()):
            start = max(vtimes.get(tenant, 0.0), level_vtime)
            heap.append((start, queue[0].message.enqueued_at, seq, tenant))
            taken[tenant] = 0
        heapq.heapify(heap)
        out: list[Candidate] = []
        while heap and len(out) < k:
            start, _, seq, tenant = heapq.heappop(heap)
            if tenant in room:
                if room[tenant] <= 0:
                    continue  # at its max_in_flight: none of its messages this round
                room[tenant] -= 1
            queue = self.tenants[tenant]
            cand = queue[taken[tenant]]
            out.append(cand)
            taken[tenant] += 1
            if taken[tenant] < len(queue):
                nxt = queue[taken[tenant]]
                heapq.heappush(heap, (start + cand.cost, nxt.message.enqueued_at, seq, tenant))
        return out
