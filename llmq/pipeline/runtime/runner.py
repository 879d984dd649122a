"""The consumer loop every stage shares: read a batch, hand it to the stage, commit what it decided.

Entries the stage leaves unsettled (or all of them when ``handle`` raises) stay pending; the runner pages
through its own pending entries (never those it holds) before reading new ones: at start, after a failed
batch, after an error that may have lost a reply, and every third of the claim timeout. Beside the loop,
its maintenance renews the leases of what it holds and takes over dead consumers' entries
(``llmq.pipeline.runtime.reclaim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llmq.pipeline import background, metrics
from llmq.pipeline.backoff import Backoff
from llmq.pipeline.errors import GiveBack
from llmq.pipeline.keys import Keys
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.effects import Commit
from llmq.pipeline.runtime.reclaim import Delivered, Reclaimer
from llmq.pipeline.runtime.stage import Stage
from llmq.pipeline.runtime.streams import Entry, as_str, ensure_group, parse_entries

log = logging.getLogger("llmq.stage")


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    batch_size: int
    block_ms: int
    max_in_hand: int
    """Most entries held (read, not yet committed) at once; reads stop when this many are in hand."""
    claim_timeout_s: float
    max_deliveries: int
    grace_s: float
    result_retention_s: float = 24 * 3600
    """How long the status of a message dead-lettered as poison stays readable (queue.result_retention)."""
    consumer_lease_s: float | None = None
    """How long a consumer's name lease (``llmq.pipeline.runtime.names``) lasts without being refreshed. When set, the
    entries of a consumer whose lease has expired are taken over at once (a pod replaced under a new name),
    instead of after the claim timeout. Only where every consumer of the group holds a lease, as every
    ``llmq-stage run`` process does. A live consumer cut off from Redis for longer than this is taken for
    dead: the calls it is making are made again (its commits then change nothing)."""


GROUP_GONE = ("NOGROUP", "UNBLOCKED")
"""How Redis says a read's group is gone: NOGROUP, or UNBLOCKED for a read that was blocked when its stream
was deleted (Redis 7.0; Valkey answers NOGROUP) or when the server became a replica. Either way the group
is created again if it is missing (BUSYGROUP when it is not)."""
DEAD_CONSUMERS_EVERY_S = 5.0
"""How often a consumer looks for consumers of its group whose name lease expired, to take over their
entries (``RunnerSettings.consumer_lease_s``)."""


class Runner:
    """Runs one stage as one consumer of its group until ``stop()``."""

    def __init__(
        self,
        stage: Stage,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        consumer: str,
        settings: RunnerSettings,
    ) -> None:
        self.stage = stage
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self.settings = settings
        self.group = stage.name
        self.stream = stage.stream
        self.max_in_hand = stage.max_in_hand or settings.max_in_hand
        self.in_hand: dict[str, float] = {}
        """Entry id -> monotonic time it was taken; what lease renewal covers."""
        self.redis_ok = True
        """False while Redis refuses this consumer's reads or writes (down, full, a replica, ...)."""
        self.redis_error: str | None = None
        """The last error Redis answered the read loop with that is not "unavailable" (a key of another type
        on this prefix, say), until a read succeeds again: health says degraded meanwhile."""
        self.handled = 0
        self._stopping = asyncio.Event()
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._own_cursor: str | None = "-"
        """Where paging through this consumer's own pending entries goes on from ("-": the start); None
        while not paging."""
        self._next_own_sweep = 0.0
        self._group_missing = True
        """The group is to be created (at start, or after Redis lost it) before the next read."""
        self._connected_since = time.monotonic()
        """When this consumer last saw Redis unavailable: it trusts a missing lease only once it has reached
        Redis for a whole lease itself (after an outage every lease has lapsed, the live ones too)."""
        self._deliveries: dict[str, int] = {}
        """Entry id -> how many times it had been delivered when taken into hand."""
        self._given_back: dict[str, int] = {}
        """Entries left unsettled on a clean stop (never handled), with their delivery counts: that last
        delivery is not counted."""
        self._taking = asyncio.Lock()
        """Held while entries join this consumer's pending list and until they are in hand (a read, a
        claim), so a page of its own pending entries never mistakes them for ones it left behind."""
        self._min_read = max(1, min(settings.batch_size, self.max_in_hand) // 4)
        # Children looked up once: labels() costs about 2 µs a call, and these are set for every batch.
        self._in_hand_gauge = metrics.STAGE_IN_HAND.labels(stage=stage.name)
        self._batch_seconds = metrics.STAGE_BATCH_SECONDS.labels(stage=stage.name)
        self._acked = metrics.STAGE_ENTRIES.labels(stage=stage.name, outcome="acked")
        self._settled_elsewhere = metrics.STAGE_ENTRIES.labels(stage=stage.name, outcome="settled_elsewhere")
        self.commit = Commit(redis, stream=self.stream, group=self.group, channel=keys.finished, dlq=keys.dlq)
        self.reclaimer = Reclaimer(
            redis=redis,
            keys=keys,
            stream=self.stream,
            group=self.group,
            consumer=consumer,
            commit=self.commit,
            claim_timeout_s=settings.claim_timeout_s,
            max_deliveries=settings.max_deliveries,
            result_retention_s=settings.result_retention_s,
        )

    async def ensure_group(self) -> None:
        """Create the consumer group (and stream) if missing; an existing group is fine."""
        await ensure_group(self.redis, self.stream, self.group)

    def stop(self) -> None:
        """Stop reading; in-hand work finishes (within the grace period) in ``run``."""
        if not self._stopping.is_set():
            self._stopping.set()
            self.stage.on_stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Read and handle until stopped, then drain in-hand batches for up to ``grace_s``."""
        maintenance = asyncio.create_task(self._maintain(), name=f"{self.group}-maintain")
        backoff = Backoff(initial_s=0.05, max_s=5.0)
        try:
            while not self.stopping:
                try:
                    if self._group_missing:
                        await self._recreate_group()
                    if await self._read_once():  # a read that wrote (XREADGROUP): Redis takes writes again
                        self.redis_ok, self.redis_error = True, None
                        backoff.reset()
                except UNAVAILABLE as exc:
                    self._unavailable()
                    metrics.STAGE_ERRORS.labels(stage=self.group, kind="redis").inc()
                    log.warning("redis unavailable: %s", exc, extra=self._ctx())
                    await self._sleep(backoff.next())
                except ResponseError as exc:
                    if str(exc).startswith(GROUP_GONE):
                        log.warning("read interrupted: %s", exc, extra=self._ctx())
                        self._group_missing = True
                        continue
                    # A loop boundary: an error Redis should not give (a key of another type, say) is logged,
                    # counted, shown by health and waited out, not turned into a crash loop of the process.
                    self.redis_error = str(exc)[:200]
                    metrics.STAGE_ERRORS.labels(stage=self.group, kind="server").inc()
                    log.error("read failed", exc_info=True, extra=self._ctx())
                    await self._sleep(backoff.next())
        finally:
            try:
                await self._drain()  # leases are renewed meanwhile: a long call is not taken over while it ends
                await self._give_back()
            finally:
                maintenance.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await maintenance

    def _unavailable(self) -> None:
        self.redis_ok = False
        self._connected_since = time.monotonic()
        # The reply of a read or a claim may have been lost after Redis gave us entries.
        self._reread_own()

    async def _recreate_group(self) -> None:
        """Create the group if missing: at start, or when Redis restarted without its data or someone deleted
        the stream. What this consumer held then is pending nowhere; new entries are read into a new group."""
        if await ensure_group(self.redis, self.stream, self.group) and self.handled:
            metrics.STAGE_ERRORS.labels(stage=self.group, kind="nogroup").inc()
            log.error(
                "consumer group %s of %s was missing: created it again", self.group, self.stream, extra=self._ctx()
            )
        self._group_missing = False
        self._reread_own()

    async def _give_back(self) -> None:
        """Stopping cleanly, undo the delivery count of the entries given back unhandled, so that rolling
        restarts during a backlog never make poison of what waited through them."""
        given_back = [(Entry(eid, b""), n) for eid, n in self._given_back.items() if eid not in self.in_hand]
        self._given_back.clear()
        if given_back:
            with contextlib.suppress(*UNAVAILABLE):
                await self.reclaimer.give_back(given_back)

    def _reread_own(self) -> None:
        self._own_cursor = "-"

    async def _read_once(self) -> bool:
        """One read (or a wait for capacity); True when it was a read of new entries that Redis answered."""
        if self._room() is None:
            # Under load, wait until a quarter batch is free: reading one entry per freed slot would make
            # the read loop, one round trip per XREADGROUP, the bottleneck of the stage.
            self._capacity.clear()
            stop = asyncio.create_task(self._stopping.wait())
            cap = asyncio.create_task(self._capacity.wait())
            await asyncio.wait({stop, cap}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            cap.cancel()
            return False
        now = time.monotonic()
        if now >= self._next_own_sweep:
            # Entries can be left in our pending list without our knowing: a read whose reply was lost and
            # that redis-py sent again on a new connection delivered them to us, then the next ones.
            self._next_own_sweep = now + self.settings.claim_timeout_s / 3
            self._reread_own()
        async with self._taking:
            count = self._room()  # again: a claim may have taken entries while we waited for the lock
            if count is None:
                return False
            new = self._own_cursor is None
            delivered = await (self._read_new(count) if new else self._read_own(count))
            if delivered:
                self._start(delivered)
            return new

    def _room(self) -> int | None:
        """How many entries to read now, or None to wait for capacity. Under load, wait until a quarter batch
        is free: reading one entry per freed slot would make the read loop, one round trip per XREADGROUP,
        the bottleneck of the stage."""
        free = self.max_in_hand - len(self.in_hand)
        if free <= 0 or (self.in_hand and free < self._min_read):
            return None
        return min(self.settings.batch_size, free)

    async def _read_new(self, count: int) -> list[Delivered]:
        read = asyncio.create_task(self._xreadgroup(">", count, block=self.settings.block_ms))
        stop = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if read not in done:
            # Stopping: an entry delivered to a cancelled read stays in our PEL and is re-read on restart
            # (or reclaimed), so nothing is lost.
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError, *UNAVAILABLE):
                await read
            return []
        reply = read.result()
        return [(e, 1) for e in parse_entries(reply[0][1])] if reply else []

    async def _read_own(self, count: int) -> list[Delivered]:
        """Up to ``count`` of this consumer's own pending entries that it does not hold (left by a previous
        run of it, by a failed batch, or by a lost reply), from where paging left off. Paging ends with an
        empty page."""
        cursor = self._own_cursor or "-"
        rows: Any = await self.redis.xpending_range(
            self.stream,
            self.group,
            min=cursor if cursor == "-" else f"({cursor}",
            max="+",
            count=self.settings.batch_size,
            consumername=self.consumer,
        )
        if not rows:
            self._own_cursor = None
            return []
        wanted: list[str] = []
        for row in rows:
            self._own_cursor = as_str(row["message_id"])
            if self._own_cursor not in self.in_hand:
                wanted.append(self._own_cursor)
                if len(wanted) == count:
                    break
        taken = await self.reclaimer.take(wanted, owner=self.consumer)
        if not taken:
            return []
        log.info("re-reading %d own pending entries", len(taken), extra=self._ctx(len(taken)))
        return await self.reclaimer.drop_poison(taken)

    async def _xreadgroup(self, start: str, count: int, *, block: int | None) -> Any:
        return await self.redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count, block=block)

    def _start(self, delivered: list[Delivered]) -> None:
        now = time.monotonic()
        entries = []
        for e, n in delivered:
            self.in_hand[e.id] = now
            self._deliveries[e.id] = n
            entries.append(e)
        self._in_hand_gauge.set(len(self.in_hand))
        task = asyncio.create_task(self._handle(entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, entries: list[Entry]) -> None:
        started = time.perf_counter()
        clean = False
        try:
            clean = await self._settle(entries)
        finally:
            left = [e.id for e in entries if e.id in self.in_hand]
            if left:
                if clean and self.stopping:  # handed back unhandled, not failed
                    self._given_back.update((eid, self._deliveries.get(eid, 1)) for eid in left)
                self._reread_own()  # some were left unsettled: re-read them
                for eid in left:
                    self.in_hand.pop(eid, None)
                    self._deliveries.pop(eid, None)
                self._capacity.set()
            self._in_hand_gauge.set(len(self.in_hand))
            self._batch_seconds.observe(time.perf_counter() - started)

    async def _settle(self, entries: list[Entry]) -> bool:
        """Hand the entries to the stage and commit its decisions. While Redis is unavailable the entries
        not yet settled are handed to it again in this process, after a pause: re-reading them would count
        a delivery each time, and a few seconds of a full Redis would make poison of them. False when the
        stage failed: what it did not settle is re-read later, and that counts."""
        backoff = Backoff(initial_s=0.05, max_s=2.0)
        retry = False
        taken = time.monotonic()
        while True:
            if retry:
                # Only what is still ours: another consumer may have taken entries over meanwhile (their lease
                # lapsed while Redis was away); renewing does not count a delivery.
                self._drop(await self.reclaimer.renew([e.id for e in entries if e.id in self.in_hand]))
            batch = Batch(
                [e for e in entries if e.id in self.in_hand],
                commit=self.commit,
                consumer=self.consumer,
                on_commit=self._committed,
                owned_for_sure=not retry and time.monotonic() - taken < self.settings.claim_timeout_s / 3,
            )
            try:
                if batch.entries:
                    await self.stage.handle(batch)
                    await batch.commit()
                return True
            except GiveBack:
                return True
            except UNAVAILABLE as exc:
                self.redis_ok = False
                metrics.STAGE_ERRORS.labels(stage=self.group, kind="redis").inc()
                log.warning("batch paused, redis unavailable: %s", exc, extra=self._ctx(len(batch.entries)))
                if await background.wait_event(self._stopping, backoff.next()):
                    return True  # stopping: handed back, unhandled
                retry = True
            except Exception:
                # A loop boundary: what was not committed stays pending and is re-read after a pause.
                metrics.STAGE_ERRORS.labels(stage=self.group, kind="handle").inc()
                log.error("batch failed, entries stay pending", exc_info=True, extra=self._ctx(len(entries)))
                await self._sleep(1.0)
                return False
            finally:
                batch.discard()

    def _drop(self, lost: set[str]) -> None:
        """Entries another consumer owns now: no longer ours to renew, retry or give back (a batch that is
        still handling one commits nothing for it: its ack finds it settled or owned elsewhere)."""
        lost &= self.in_hand.keys()
        if lost:
            log.warning("lost %d in-hand entries to another consumer", len(lost), extra=self._ctx())
            for eid in lost:
                self.in_hand.pop(eid, None)
                self._deliveries.pop(eid, None)
            self._capacity.set()

    def _committed(self, entry_ids: list[str], elsewhere: int) -> None:
        for eid in entry_ids:
            self.in_hand.pop(eid, None)
            self._deliveries.pop(eid, None)
        self.handled += len(entry_ids)
        self._acked.inc(len(entry_ids) - elsewhere)
        if elsewhere:
            # Another consumer took these over (their lease had expired) and settled them first.
            self._settled_elsewhere.inc(elsewhere)
        self._in_hand_gauge.set(len(self.in_hand))
        self._capacity.set()

    async def _maintain(self) -> None:
        """Renew leases of in-hand entries; take over dead consumers' entries; forget dead consumers."""
        renew_every = self.settings.claim_timeout_s / 3
        claim_every = max(self.settings.claim_timeout_s / 2, 0.05)
        next_claim = 0.0
        while True:
            await asyncio.sleep(min(renew_every, claim_every, DEAD_CONSUMERS_EVERY_S))
            try:
                now = time.monotonic()
                old = [eid for eid, t in self.in_hand.items() if now - t >= renew_every]
                if old:
                    lost = await self.reclaimer.renew(old)
                    for eid in old:
                        if eid not in lost and eid in self.in_hand:
                            self.in_hand[eid] = now
                    self._drop(lost)
                if self.stopping:
                    continue
                lease_s = self.settings.consumer_lease_s
                if lease_s is not None and now - self._connected_since >= lease_s:
                    await self._claim(self.reclaimer.claim_dead)
                if now >= next_claim:
                    next_claim = now + claim_every
                    await self._claim(lambda n: self.reclaimer.claim(n, skip=self.in_hand))
                    await self.reclaimer.forget_dead_consumers()
            except UNAVAILABLE as exc:
                self._unavailable()
                log.warning("maintenance skipped, redis unavailable: %s", exc, extra=self._ctx())
            except Exception:  # a loop boundary: leases must go on being renewed whatever failed once
                log.error("maintenance failed", exc_info=True, extra=self._ctx())

    async def _claim(self, claim: Callable[[int], Awaitable[list[Delivered]]]) -> None:
        """Start what ``claim(n)`` takes over, up to what this consumer has room for."""
        async with self._taking:
            free = self.max_in_hand - len(self.in_hand)
            if free > 0:
                claimed = await claim(min(free, self.settings.batch_size))
                if claimed:
                    self._start(claimed)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        pending = len(self.in_hand)
        log.info("draining %d in-hand entries", pending, extra=self._ctx())
        _, late = await asyncio.wait(set(self._tasks), timeout=self.settings.grace_s)
        for task in late:
            task.cancel()
        if late:
            # Unfinished entries stay in the PEL: this consumer re-reads them on restart, or another
            # consumer reclaims them after the claim timeout.
            await asyncio.wait(late)
            log.warning("grace period over, %d batches left pending", len(late), extra=self._ctx())

    async def _sleep(self, seconds: float) -> None:
        await background.wait_event(self._stopping, seconds)

    def _ctx(self, entries: int | None = None) -> dict[str, Any]:
        ctx: dict[str, Any] = {"stage": self.group, "consumer": self.consumer}
        if entries is not None:
            ctx["entries"] = entries
        return ctx
