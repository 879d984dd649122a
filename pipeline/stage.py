"""The consumer loop every stage shares: read a batch, hand it to the stage, commit what it decided.

A stage implements ``handle(batch)``; it decides per entry and records the decision on the Batch
(``ack`` or ``forward``), optionally queueing further commands on ``batch.tx``. The runner then commits
every decision of the batch in one MULTI/EXEC, so each hand-off (XADD next + XACK current) is atomic.
Entries the stage leaves unsettled (or all of them when ``handle`` raises) stay pending: the runner
re-reads its own pending entries (id ``0``) before new ones (``>``), after a backoff.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from pipeline import metrics, tasks
from pipeline.backoff import Backoff
from pipeline.errors import GiveBack
from pipeline.keys import Keys
from pipeline.models import FIELD
from pipeline.outcomes import announce
from pipeline.reclaim import Reclaimer
from pipeline.redis import CONNECTION_ERRORS
from pipeline.streams import Entry, ensure_group, parse_entries

log = logging.getLogger("llmq.stage")


class Batch:
    """The entries handed to a stage in one call, and what the stage decided for each.

    Decisions (``ack``, ``forward`` and any command queued on ``tx``) commit together in one MULTI/EXEC:
    when ``handle`` returns, or earlier at each ``await batch.commit()``, which lets a stage that handles
    entries concurrently (dispatch) or over time (schedule) commit each as it finishes.
    """

    __slots__ = (
        "_committing",
        "_keys",
        "_on_commit",
        "_redis",
        "_settled",
        "acked",
        "entries",
        "finished",
        "group",
        "stream",
        "tx",
    )

    def __init__(
        self,
        entries: list[Entry],
        *,
        redis: aioredis.Redis,
        keys: Keys,
        stream: str,
        group: str,
        on_commit: Callable[[list[str]], None],
    ) -> None:
        self.entries = entries
        self.stream = stream
        self.group = group
        self._redis = redis
        self._keys = keys
        self._on_commit = on_commit
        self.tx: Pipeline = redis.pipeline(transaction=True)
        """A MULTI/EXEC pipeline; commands queued here commit together with the acks."""
        self.finished: list[str] = []
        """Ids of messages whose outcome is queued on ``tx`` (``record_outcome``): one notice at the commit."""
        self.acked: list[str] = []
        self._settled: list[str] = []
        self._committing = asyncio.Lock()

    def ack(self, entry: Entry) -> None:
        """The entry is finished; it is acked at the next commit."""
        self.acked.append(entry.id)

    def forward(self, entry: Entry, stream: str, payload: bytes) -> None:
        """Hand the entry to the next stream: XADD there and XACK here, in the same transaction."""
        self.tx.xadd(stream, {FIELD: payload})
        self.acked.append(entry.id)

    def settled(self, entry: Entry) -> None:
        """The entry was already acked by a script of the stage, atomically with its hand-off."""
        self._settled.append(entry.id)

    async def commit(self) -> None:
        """Execute what was decided so far.

        Group commit: the transaction is swapped out before executing, so other coroutines of the same
        stage keep queueing decisions meanwhile, and those that call ``commit`` during an execute wait
        for it, then the first of them commits everything queued by all of them in one MULTI/EXEC. On a
        Redis error nothing of that transaction is applied and its entries stay pending (the runner
        re-reads what was not committed), so every decision must be safe to make twice.
        """
        async with self._committing:
            tx, acked, settled, finished = self.tx, self.acked, self._settled, self.finished
            self.tx, self.acked, self._settled, self.finished = self._redis.pipeline(transaction=True), [], [], []
            announce(tx, self._keys, finished)
            if acked:
                tx.xack(self.stream, self.group, *acked)
            if tx.command_stack:
                await tx.execute()
            if acked or settled:
                self._on_commit(acked + settled)

    async def discard(self) -> None:
        self.finished = []
        await self.tx.reset()  # type: ignore[no-untyped-call]


class Stage(abc.ABC):
    """A consuming stage: its own decision per batch; the runner owns the loop around it."""

    name: str
    """Also the consumer group name."""
    stream: str
    """The stream the stage consumes."""

    @abc.abstractmethod
    async def handle(self, batch: Batch) -> None:
        """Decide for each entry of the batch (``batch.ack`` / ``batch.forward``). Must be idempotent:
        an entry can be delivered again after its consumer died."""

    async def start(self) -> None:
        """Open what the stage needs beyond Redis (pools, clients). Called before the first read."""

    async def close(self) -> None:
        """Release what ``start`` opened. Called after the last batch committed."""

    def on_stop(self) -> None:
        """Shutdown began: a stage whose ``handle`` waits (for capacity, say) should give entries back now
        (leave them unsettled) instead of holding them through the grace period."""

    async def health(self) -> dict[str, str]:
        """Component checks beyond Redis, e.g. ``{"postgres": "ok"}``; "degraded" or "down" values count."""
        return {}

    max_in_hand: int | None = None
    """Most entries this stage holds at once (read, not committed); the runner's setting when None."""


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
        self.handled = 0
        self._stopping = asyncio.Event()
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._read_own_pending = True
        self._min_read = max(1, min(settings.batch_size, self.max_in_hand) // 4)
        # Children looked up once: labels() costs about 2 µs a call, and these are set for every batch.
        self._in_hand_gauge = metrics.STAGE_IN_HAND.labels(stage=stage.name)
        self._batch_seconds = metrics.STAGE_BATCH_SECONDS.labels(stage=stage.name)
        self._acked = metrics.STAGE_ENTRIES.labels(stage=stage.name, outcome="acked")
        self.reclaimer = Reclaimer(
            redis=redis,
            keys=keys,
            stream=self.stream,
            group=self.group,
            consumer=consumer,
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
        await self.ensure_group()
        maintenance = asyncio.create_task(self._maintain(), name=f"{self.group}-maintain")
        backoff = Backoff(initial_s=0.05, max_s=5.0)
        try:
            while not self.stopping:
                try:
                    await self._read_once()
                    self.redis_ok = True
                    backoff.reset()
                except CONNECTION_ERRORS as exc:
                    self.redis_ok = False
                    metrics.STAGE_ERRORS.labels(stage=self.group, kind="redis").inc()
                    log.warning("redis unavailable: %s", exc, extra=self._ctx())
                    await self._sleep(backoff.next())
        finally:
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            await self._drain()

    async def _read_once(self) -> None:
        free = self.max_in_hand - len(self.in_hand)
        if free <= 0 or (self.in_hand and free < self._min_read):
            # Under load, wait until a quarter batch is free: reading one entry per freed slot would make
            # the read loop, one round trip per XREADGROUP, the bottleneck of the stage.
            self._capacity.clear()
            stop = asyncio.create_task(self._stopping.wait())
            cap = asyncio.create_task(self._capacity.wait())
            await asyncio.wait({stop, cap}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            cap.cancel()
            return
        count = min(self.settings.batch_size, free)
        if self._read_own_pending:
            entries = await self._read_pending(count)
            if entries is None:  # own PEL exhausted: from now on, new entries
                self._read_own_pending = False
                return
        else:
            entries = await self._read_new(count)
        if entries:
            self._start(entries)

    async def _read_new(self, count: int) -> list[Entry]:
        read = asyncio.create_task(self._xreadgroup(">", count, block=self.settings.block_ms))
        stop = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if read not in done:
            # Stopping: an entry delivered to a cancelled read stays in our PEL and is re-read on restart
            # (or reclaimed), so nothing is lost.
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError, *CONNECTION_ERRORS):
                await read
            return []
        reply = read.result()
        return parse_entries(reply[0][1]) if reply else []

    async def _read_pending(self, count: int) -> list[Entry] | None:
        """Own pending entries (left by a previous run of this consumer or by a failed batch), not in hand.
        None when there are none left."""
        reply = await self._xreadgroup("0", count, block=None)
        entries = [e for e in parse_entries(reply[0][1]) if e.id not in self.in_hand] if reply else []
        # Entries trimmed while pending come back with no fields: nothing left to handle, so ack them.
        gone = [e.id for e in entries if not e.data]
        if gone:
            await self.redis.xack(self.stream, self.group, *gone)
        entries = [e for e in entries if e.data]
        if not entries:
            return None
        log.info("re-reading %d own pending entries", len(entries), extra=self._ctx(len(entries)))
        return await self.reclaimer.drop_poison(entries)

    async def _xreadgroup(self, start: str, count: int, *, block: int | None) -> Any:
        return await self.redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count, block=block)

    def _start(self, entries: list[Entry]) -> None:
        now = time.monotonic()
        for e in entries:
            self.in_hand[e.id] = now
        self._in_hand_gauge.set(len(self.in_hand))
        task = asyncio.create_task(self._handle(entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, entries: list[Entry]) -> None:
        started = time.perf_counter()
        batch = Batch(
            entries, redis=self.redis, keys=self.keys, stream=self.stream, group=self.group, on_commit=self._committed
        )
        try:
            await self.stage.handle(batch)
            await batch.commit()
        except asyncio.CancelledError:
            raise
        except GiveBack:
            self._read_own_pending = True
        except Exception as exc:
            # A loop boundary: what was not committed stays pending and is re-read after a pause.
            kind = "redis" if isinstance(exc, CONNECTION_ERRORS) else "handle"
            metrics.STAGE_ERRORS.labels(stage=self.group, kind=kind).inc()
            log.error("batch failed, entries stay pending", exc_info=True, extra=self._ctx(len(entries)))
            self._read_own_pending = True
            await self._sleep(1.0)
        finally:
            await batch.discard()
            if any(e.id in self.in_hand for e in entries):
                self._read_own_pending = True  # some were left unsettled: re-read them
                for e in entries:
                    self.in_hand.pop(e.id, None)
                self._capacity.set()
            self._in_hand_gauge.set(len(self.in_hand))
            self._batch_seconds.observe(time.perf_counter() - started)

    def _committed(self, entry_ids: list[str]) -> None:
        for eid in entry_ids:
            self.in_hand.pop(eid, None)
        self.handled += len(entry_ids)
        self._acked.inc(len(entry_ids))
        self._in_hand_gauge.set(len(self.in_hand))
        self._capacity.set()

    async def _maintain(self) -> None:
        """Renew leases of in-hand entries; reclaim dead consumers' entries; forget dead consumers."""
        renew_every = self.settings.claim_timeout_s / 3
        claim_every = max(self.settings.claim_timeout_s / 2, 0.05)
        next_claim = 0.0
        while True:
            await asyncio.sleep(min(renew_every, claim_every))
            try:
                now = time.monotonic()
                old = [eid for eid, t in self.in_hand.items() if now - t >= renew_every]
                if old:
                    lost = await self.reclaimer.renew(old)
                    for eid in old:
                        if eid not in lost and eid in self.in_hand:
                            self.in_hand[eid] = now
                    if lost:
                        log.warning("lost %d in-hand entries to another consumer", len(lost), extra=self._ctx())
                if now >= next_claim and not self.stopping:
                    next_claim = now + claim_every
                    free = self.max_in_hand - len(self.in_hand)
                    if free > 0:
                        claimed = await self.reclaimer.claim(min(free, self.settings.batch_size))
                        if claimed:
                            self._start(claimed)
                    await self.reclaimer.forget_dead_consumers()
            except CONNECTION_ERRORS as exc:
                log.warning("maintenance skipped, redis unavailable: %s", exc, extra=self._ctx())
            except ResponseError:
                log.error("maintenance failed", exc_info=True, extra=self._ctx())

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
        await tasks.wait_event(self._stopping, seconds)

    def _ctx(self, entries: int | None = None) -> dict[str, Any]:
        ctx: dict[str, Any] = {"stage": self.group, "consumer": self.consumer}
        if entries is not None:
            ctx["entries"] = entries
        return ctx
