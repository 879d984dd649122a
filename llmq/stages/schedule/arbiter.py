"""The arbiter: one per scheduler process, it orders the waiting messages of every level and admits them as
backend slots free up.

It picks the next messages with ``admission.select`` and admits them with one call of
``scripts/admit.lua`` per run of one level: the script re-checks the limits against in-flight leases (a
sorted set per level scored by lease expiry, so a crashed dispatcher's slots free themselves), acks each
message in its level and does the hand-off — ZADD in-flight, XADD dispatch, status "scheduled" —
atomically. Several scheduler processes therefore never over-admit, and a repeated admission admits
nothing twice. Within a level, tenants take turns by their fair shares (``fair``): the script moves their
virtual times with each admission. While a backlog waits and calls take a regular time, the admissions of
every level but the top one and those with reserved slots are staggered (``stagger``); the time of the
next one is kept in Redis for every scheduler process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from llmq.pipeline import background, inflight, pausing, window
from llmq.pipeline.config import Config, LevelConfig
from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.lua import Lua
from llmq.pipeline.metrics import QUEUE_WAIT, SCHEDULED
from llmq.pipeline.models import Message, Status
from llmq.pipeline.notify import Listener
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime.streams import Entry, as_str
from llmq.pipeline.transitions import UNENDED_TTL_S
from llmq.stages.schedule.admission import LevelView, select
from llmq.stages.schedule.fair import VTIME_TTL_S, LevelQueue
from llmq.stages.schedule.stagger import Stagger, stagger

log = logging.getLogger("llmq.schedule")

GROUP = Group.SCHEDULE.value
POLL_S = 0.05
"""While messages wait, how often the arbiter re-reads the in-flight counts even without a notice (a
missed notice, an expired lease). Normally it wakes on the ``finished``/``slots`` notice of a freed slot."""

SLO_VIOLATIONS = Counter("llmq_slo_violations_total", "Admissions later than the level's max_wait_time", ["level"])
INFLIGHT = Gauge("llmq_inflight", "Admitted messages not yet finished", ["level"])
PAUSED = Gauge("llmq_level_paused", "1 while the level's admission is paused (llmq-stage pause)", ["level"])
STAGGER = Gauge("llmq_admission_stagger_seconds", "Spacing between staggered admissions (0: not staggering)")

GONE: Literal["gone"] = "gone"
Decision = Status | Literal["gone"] | None
"""What became of an offered message: SCHEDULED (admitted: the script acked its entry), EXPIRED or
CANCELLED (to record), another terminal status (ended already: ack, record nothing), GONE (no longer
pending: another scheduler or a resent admission settled it), or None (given back, shutting down)."""
Decisions = asyncio.Queue[tuple["Candidate", Decision]]
"""Where an intake learns what became of the messages it offered, in the order they were decided."""


@dataclass(slots=True)
class Candidate:
    entry: Entry
    message: Message
    decisions: Decisions
    cost: float = 1.0
    """Its estimated tokens over its tenant's weight: how far its admission moves the tenant's virtual time."""
    decided: bool = False

    def decide(self, status: Decision) -> None:
        """Only the first decision counts.

        A queue shared by the intake's batch, not a future per message: waiting on a batch's futures
        with ``asyncio.wait`` took 88 µs per decision with 1000 in hand decided one at a time, as
        staggered admissions are, against 3.5 µs."""
        if not self.decided:
            self.decided = True
            self.decisions.put_nowait((self, status))


class Arbiter:
    """Orders the waiting messages of every level of this process and admits them as slots free up."""

    def __init__(self, config: Config, *, redis: aioredis.Redis, keys: Keys) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self.levels = sorted(config.queue.levels, key=lambda lv: lv.priority)
        self.by_name = {lv.name: lv for lv in self.levels}
        self.capacity = config.capacity
        """The backends' slots; with adaptive backends, as their windows stood at the last round."""
        self.followed = [b for b in config.backends if b.followed]
        """Backends whose share of the capacity moves: adaptive windows, engines that can be held."""
        self.reserve_window_s = config.scheduler.reserve_window.seconds
        self.reserving = [lv for lv in self.levels if lv.reserved] if self.reserve_window_s > 0 else []
        """The levels whose reserved slots are kept only while they are active (``scheduler.reserve_window``)."""
        self.reserved = {lv.name: lv.reserved for lv in self.levels}
        """Each level's reserved slots as kept now."""
        self.overcommit = sum(b.overcommit for b in config.backends)
        """Calls the top level may have over the capacity, on backends that schedule by priority."""
        self.lease_s = config.lease_s
        self.waiting: dict[str, LevelQueue] = {lv.name: LevelQueue() for lv in self.levels}
        self._wake = asyncio.Event()
        self._wrr: dict[str, int] = {}
        self._admit = Lua(redis, "admit")
        self._task: asyncio.Task[None] | None = None
        self._freed = Listener(redis=redis, channels=[keys.finished, keys.slots], on_message=self._slot_freed)
        self.staggered = config.staggered
        self.stagger = Stagger(self.capacity - sum(lv.reserved for lv in self.levels))
        self._admitted_at: dict[str, float] = {}
        """When this process admitted each message still in flight, oldest first (for ``stagger``)."""
        self._stagger_next = 0.0
        self._held = False
        """The last round held staggered messages back: wake at ``_stagger_next`` for the next one."""

    def _slot_freed(self, channel: str, data: str) -> None:
        if channel == self.keys.finished and self.staggered:
            now = time.time()
            for message_id in data.split():
                admitted = self._admitted_at.pop(message_id, None)
                if admitted is not None:
                    self.stagger.observe(now - admitted)
        if self._has_waiting():
            self._wake.set()

    def offer(self, level: str, candidates: list[Candidate]) -> None:
        self.waiting[level].extend(candidates)
        self._wake.set()

    def start(self) -> None:
        self._freed.start()
        self._task = asyncio.create_task(self._run(), name="arbiter")

    async def close(self) -> None:
        await background.cancel(self._task)
        await self._freed.close()
        self.give_back()

    def give_back(self) -> None:
        """Stop admitting: every waiting message stays pending in its stream (re-read on restart)."""
        for queue in self.waiting.values():
            for cand in queue:
                cand.decide(None)  # stays pending in its stream; re-read on restart or reclaimed
            queue.clear()

    async def _run(self) -> None:
        idle_s = self.config.scheduler.check_interval.seconds
        while True:
            timeout_s = POLL_S if self._has_waiting() else idle_s
            if self._held:
                timeout_s = min(timeout_s, max(0.0, self._stagger_next - time.time()))
            await background.wait_event(self._wake, timeout_s)
            self._wake.clear()
            try:
                await self._round()
            except UNAVAILABLE as exc:
                log.warning("admission paused, redis unavailable: %s", exc)
                await asyncio.sleep(0.5)
            except Exception:  # a loop boundary: one failed round must not end admission for the process
                log.error("admission round failed", exc_info=True)
                await asyncio.sleep(0.5)

    def _has_waiting(self) -> bool:
        return any(self.waiting.values())

    async def _round(self) -> None:
        now = time.time()
        self._expire(now)
        # Where tenants wait together, their virtual times are read to order them; where a tenant waiting has a
        # max_in_flight, its messages running.
        shared = [name for name, q in self.waiting.items() if len(q.tenants) > 1]
        capped = {t for q in self.waiting.values() for t in q.tenants if self.config.tenant(t).max_in_flight}
        pipe = self.redis.pipeline(transaction=False)
        for name in shared:
            tenants = list(self.waiting[name].tenants)
            pipe.mget([self.keys.level_vtime(name)] + [self.keys.tenant_vtime(name, t) for t in tenants])
        for t in capped:
            pipe.zcount(self.keys.tenant_running(t), now - UNENDED_TTL_S, "+inf")
        for lv in self.levels:
            inflight.count_live(pipe, self.keys, lv.name, now)
        for b in self.followed:
            pipe.hget(self.keys.backend_limit(b.name), "limit")
            pipe.exists(self.keys.backend_held(b.name))
            pipe.zcount(self.keys.backend_slots(b.name), now, "+inf")
        if self.reserving:
            pipe.hmget(self.keys.active, [lv.name for lv in self.reserving])
        pipe.hgetall(self.keys.paused)
        replies = await pipe.execute()
        vtimes = {name: replies.pop(0) for name in shared}
        room = {t: (self.config.tenant(t).max_in_flight or 0) - int(replies.pop(0)) for t in capped}
        paused = pausing.names(replies.pop())
        for lv in self.levels:
            PAUSED.labels(level=lv.name).set(1 if pausing.is_paused(paused, lv.name) else 0)
        held = dict(zip((lv.name for lv in self.levels), map(int, replies), strict=False))
        if self.followed:
            self._follow_backends(replies[len(self.levels) : len(self.levels) + 3 * len(self.followed)])
        if self.reserving:
            self._follow_activity(replies[-1], now)
        self.stagger.slots = self.capacity - sum(self.reserved.values())
        for name, count in held.items():
            INFLIGHT.labels(level=name).set(count)
        if not self._has_waiting():
            return
        views = [_view(lv, held[lv.name], self.reserved[lv.name]) for lv in self.levels]
        free_total = self.capacity - sum(held.values())
        # Each level's next candidates in the order its tenants' shares give: no more than this round can admit.
        slots = max(0, free_total) + self.overcommit
        ordered: dict[str, list[Candidate]] = {}
        for name, queue in self.waiting.items():
            if queue and not pausing.is_paused(paused, name):
                ordered[name] = self._ordered(queue, slots, vtimes.get(name), room)
        heads = {name: [c.message.enqueued_at for c in cands] for name, cands in ordered.items()}
        order = select(heads, views, free_total, now, self.config.scheduler.strategy, self._wrr)
        if self.overcommit and not pausing.is_paused(paused, self.levels[0].name):
            order += self._overcommitted(order, held)
        gap_s = self.stagger.interval_s() if self.staggered else 0.0
        STAGGER.set(gap_s)
        # Only while a backlog waits (more than this round admits): without one nothing refills a wave later.
        picked = sum(name in self.staggered for name in order)
        staggering = gap_s > 0 and sum(len(self.waiting[name]) for name in self.staggered) > picked
        self._held = False
        if staggering:
            kept = stagger(order, self.staggered, 1 if now >= self._stagger_next else 0)
            self._held = len(kept) < len(order)
            order = kept
        reserved = {v.name: v.reserved_unused for v in views}
        used = dict.fromkeys(ordered, 0)
        for level, count in _runs(order):
            cfg = self.by_name[level]
            floor = sum(reserved[h.name] for h in self.levels if h.priority < cfg.priority)
            batch = self._take(ordered[level], used, level, count, room)
            if not batch:
                continue
            run_gap_s = gap_s if staggering and level in self.staggered else 0.0
            if run_gap_s:
                self._stagger_next = now + gap_s
            codes = await self._admit_run(cfg, batch, now, floor, run_gap_s)
            admitted = codes.count(1)
            self._held = self._held or (run_gap_s > 0 and len(codes) < len(batch))  # another scheduler's turn
            reserved[level] = max(0, reserved[level] - admitted)
            queue = self.waiting[level]
            for cand, code in zip(batch, codes, strict=False):
                queue.remove(cand)
                if code == 1:
                    self._admitted(cand, now)
                else:
                    cand.decide(GONE if code == -1 else Status(as_str(code)))
            if len(codes) < len(batch):
                break  # the limits moved under us (another scheduler admitted): recount next round

    @staticmethod
    def _ordered(
        queue: LevelQueue, k: int, vtimes: list[bytes | None] | None, room: dict[str | None, int]
    ) -> list[Candidate]:
        """The first ``k`` candidates of a level in fair order: ``vtimes`` are the level's virtual time and its
        tenants' (in the queue's order of tenants), read this round where tenants wait together; ``room`` how
        many more the tenants with a max_in_flight may have admitted (this level alone: what the round admits
        takes it, ``_take``)."""
        if vtimes is None:
            return queue.order(k, 0.0, {}, dict(room))
        level_vt, *tenant_vts = (float(v) if v is not None else 0.0 for v in vtimes)
        return queue.order(k, level_vt, dict(zip(queue.tenants, tenant_vts, strict=True)), dict(room))

    @staticmethod
    def _take(
        ordered: list[Candidate], used: dict[str, int], level: str, count: int, room: dict[str | None, int]
    ) -> list[Candidate]:
        """The next ``count`` candidates of a level's order, passing over those whose tenant's room another
        level took in this round (they wait for the next)."""
        batch: list[Candidate] = []
        i = used[level]
        while len(batch) < count and i < len(ordered):
            cand = ordered[i]
            i += 1
            tenant = cand.message.tenant
            if tenant in room:
                if room[tenant] <= 0:
                    continue
                room[tenant] -= 1
            batch.append(cand)
        used[level] = i
        return batch

    def _overcommitted(self, order: list[str], held: dict[str, int]) -> list[str]:
        """Top-level picks past the capacity, up to the backends' ``overcommit``: an engine that schedules by
        priority runs them ahead of the lower levels' calls, so they need not wait for one to end."""
        top = self.levels[0]
        picked = order.count(top.name)
        over = max(0, sum(held.values()) + len(order) - self.capacity)
        room = min(
            self.overcommit - over, len(self.waiting[top.name]) - picked, top.in_flight_cap - held[top.name] - picked
        )
        return [top.name] * max(0, room)

    def _follow_backends(self, replies: list[Any]) -> None:
        """Admit under what the backends take now: their fixed slots, their windows' limits, and no more than
        they run already for one whose engine is held."""
        now_slots: dict[str, int] = {}
        for i, b in enumerate(self.followed):
            limit, held, running = replies[3 * i : 3 * i + 3]
            n = window.slots(b, window.limit_of(limit))
            now_slots[b.name] = min(n, int(running)) if held else n
        self.capacity = sum(now_slots.get(b.name, b.slots) for b in self.config.backends)

    def _follow_activity(self, latest: list[bytes | None], now: float) -> None:
        """Keep a level's reserved slots only while it had a message within ``scheduler.reserve_window``."""
        for lv, at in zip(self.reserving, latest, strict=True):
            self.reserved[lv.name] = lv.reserved if at is not None and now - float(at) <= self.reserve_window_s else 0

    async def _admit_run(
        self, lv: LevelConfig, batch: list[Candidate], now: float, floor: int, gap_s: float
    ) -> list[int | bytes]:
        """Run the admission script (``scripts/admit.lua``) on a level's candidates: one code per candidate
        it examined."""
        keys = [self.keys.inflight(x.name) for x in self.levels]
        keys += [self.keys.inflight(lv.name), self.keys.dispatch, self.keys.level(lv.name), self.keys.stagger]
        keys.append(self.keys.level_vtime(lv.name))
        for c in batch:
            keys += [self.keys.msg(c.message.id), self.keys.tenant_vtime(lv.name, c.message.tenant)]
            keys.append(self.keys.tenant_running(c.message.tenant))
        args: list[str | bytes | float | int] = [
            now,
            now + self.lease_s,
            GROUP,
            lv.in_flight_cap,
            self.capacity + (self.overcommit if lv is self.levels[0] else 0),
            floor,
            len(self.levels),
            gap_s,
            VTIME_TTL_S,
            UNENDED_TTL_S,
        ]
        for c in batch:
            cap = self.config.tenant(c.message.tenant).max_in_flight
            args += [c.message.id, c.entry.id, c.entry.data, repr(c.cost), cap or ""]
        return list(await self._admit(keys, args))

    def _admitted(self, cand: Candidate, now: float) -> None:
        level = cand.message.level
        if self.staggered:
            self._track(cand.message.id, now)
        wait = now - cand.message.enqueued_at
        QUEUE_WAIT.labels(level=level).observe(wait)
        SCHEDULED.labels(level=level).inc()
        lv = self.by_name.get(level)
        if lv is not None and wait > lv.max_wait_time.seconds:
            SLO_VIOLATIONS.labels(level=level).inc()
        cand.decide(Status.SCHEDULED)

    def _track(self, message_id: str, now: float) -> None:
        """Remember when a message was admitted, until its finished notice; forget notices never sent
        (a retry releases its slot without one) once their lease would have expired."""
        held = self._admitted_at
        held.pop(message_id, None)  # re-admitted after a retry: to the end, keeping the oldest first
        held[message_id] = now
        while held:
            oldest = next(iter(held))
            if held[oldest] > now - self.lease_s:
                break
            del held[oldest]

    def _expire(self, now: float) -> None:
        """Messages whose deadline passed while they waited are decided EXPIRED (never dispatched)."""
        for queue in self.waiting.values():
            for c in queue.overdue(now):
                c.decide(Status.EXPIRED)


def _view(lv: LevelConfig, held: int, reserved: int) -> LevelView:
    return LevelView(
        name=lv.name,
        priority=lv.priority,
        max_wait_s=lv.max_wait_time.seconds,
        weight=lv.weight,
        free=lv.in_flight_cap - held,
        reserved_unused=max(0, reserved - held),
    )


def _runs(order: list[str]) -> list[tuple[str, int]]:
    """["a", "a", "b", "a"] -> [("a", 2), ("b", 1), ("a", 1)]: one admission script per run."""
    runs: list[tuple[str, int]] = []
    for name in order:
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1] + 1)
        else:
            runs.append((name, 1))
    return runs
