"""archive: write every terminal outcome to PostgreSQL, and keep the streams trimmed.

Each batch of ``done`` entries becomes one transaction: a COPY straight into ``messages`` (rows
formatted by ``pipeline.archive_rows``), or, when an id is there already, a COPY into a temporary table
and INSERT … ON CONFLICT (id) DO UPDATE. Entries are acked only after the commit, so a crash redelivers
them and the upsert makes the rows come out the same. While PostgreSQL is down or refuses, the batch is
retried with backoff (nothing acked, health "degraded", ``llmq_archive_backlog`` growing) until it lands.
Every ``queue.cleanup_interval`` the stage trims what every group has acked from every stream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import psycopg
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from redis.exceptions import ResponseError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from pipeline import tasks
from pipeline.archive_rows import COLUMNS, copy_rows
from pipeline.config import Config
from pipeline.db import migrate
from pipeline.errors import GiveBack
from pipeline.keys import Keys
from pipeline.models import Outcome, decode_outcome
from pipeline.queues import group_depth
from pipeline.redis import CONNECTION_ERRORS
from pipeline.stage import Batch, Stage
from pipeline.streams import as_str
from pipeline.trim import trim_acked

log = logging.getLogger("llmq.archive")

ARCHIVED = Counter("llmq_archived_total", "Outcomes committed to PostgreSQL", ["status"])
BATCH_SECONDS = Histogram(
    "llmq_archive_batch_seconds",
    "Time to write one batch to PostgreSQL",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BACKLOG = Gauge("llmq_archive_backlog", "Outcomes in the done stream not yet archived (lag + pending)")
TRIMMED = Counter("llmq_trimmed_total", "Stream entries trimmed after every group acked them", ["stream"])

_COLS = ", ".join(COLUMNS)
_UPDATE = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "id")
BACKLOG_EVERY_S = 5.0
IN_FLIGHT_BATCHES = 3
DB_ERRORS = (psycopg.OperationalError, psycopg.errors.AdminShutdown, PoolTimeout)


class Archive(Stage):
    def __init__(
        self, *, config: Config, redis: aioredis.Redis, keys: Keys, pool: AsyncConnectionPool, conninfo: str
    ) -> None:
        self.name = "archive"
        self.stream = keys.done
        self.config = config
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.conninfo = conninfo
        pg = config.database.postgres
        self.store_bodies = pg.store_bodies if pg else True
        self.db_ok = True
        # A few batches in flight (one per pooled connection) so decoding the next overlaps the write.
        self.max_in_hand = config.queue.worker.max_batch_size * IN_FLIGHT_BATCHES
        self._stopping = asyncio.Event()
        self._cleanup: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pool.open(wait=False)
        async for attempt in self._retrying():
            with attempt:
                await migrate(self.conninfo)
        self._cleanup = asyncio.create_task(self._cleanup_loop(), name="cleanup")

    async def close(self) -> None:
        await tasks.cancel(self._cleanup)
        await self.pool.close()

    def on_stop(self) -> None:
        self._stopping.set()

    async def health(self) -> dict[str, str]:
        return {"postgres": "ok" if self.db_ok else "degraded"}

    async def handle(self, batch: Batch) -> None:
        """Idempotent: rows are upserted by message id, so a redelivered batch writes the same rows."""
        latest: dict[str, Outcome] = {}
        for entry in batch.entries:
            outcome = decode_outcome(entry.data)
            latest[outcome.message.id] = outcome  # one row per id per statement
        # Sorted by id, so concurrent batches lock conflicting rows in the same order (no deadlock).
        rows = copy_rows([latest[i] for i in sorted(latest)], store_bodies=self.store_bodies)
        started = time.perf_counter()
        async for attempt in self._retrying():
            with attempt:
                await self._write(rows)
        BATCH_SECONDS.observe(time.perf_counter() - started)
        for status, n in collections.Counter(o.status for o in latest.values()).items():
            ARCHIVED.labels(status=status.value).inc(n)
        for entry in batch.entries:
            batch.ack(entry)

    async def _write(self, rows: bytes) -> None:
        """COPY the rows straight into ``messages``, each row written once. When an id is there already (a
        redelivered batch, a replayed dead letter), that transaction rolls back and the batch is upserted
        through a temporary table instead."""
        async with self.pool.connection() as conn:
            # A COPY is one statement, atomic and durable on its own: without BEGIN and COMMIT around it a
            # batch costs one round trip to PostgreSQL instead of three.
            await conn.set_autocommit(True)
            try:
                await _copy(conn, "messages", rows)
            except psycopg.errors.UniqueViolation:
                async with conn.transaction():
                    await conn.execute(
                        "CREATE TEMP TABLE IF NOT EXISTS archive_in (LIKE messages INCLUDING DEFAULTS)"
                        " ON COMMIT DELETE ROWS"
                    )
                    await _copy(conn, "archive_in", rows)
                    await conn.execute(
                        f"INSERT INTO messages ({_COLS}) SELECT {_COLS} FROM archive_in "
                        f"ON CONFLICT (id) DO UPDATE SET {_UPDATE}, archived_at = now()"
                    )
        if not self.db_ok:
            log.info("postgres is back; archiving resumed")
        self.db_ok = True

    def _retrying(self) -> AsyncRetrying:
        """Retry while PostgreSQL is unavailable, backing off up to 10 s; give up only when stopping."""

        def failed(state: Any) -> None:
            self.db_ok = False
            log.warning(
                "postgres unavailable, retrying (attempt %d): %s", state.attempt_number, state.outcome.exception()
            )

        async def wait_unless_stopping(seconds: float) -> None:
            if await tasks.wait_event(self._stopping, seconds):
                raise GiveBack  # the batch stays pending and is re-read after the restart

        return AsyncRetrying(
            retry=retry_if_exception_type(DB_ERRORS),
            wait=wait_exponential_jitter(multiplier=0.2, max=10, jitter=0.2),
            before_sleep=failed,
            sleep=wait_unless_stopping,
        )

    async def _cleanup_loop(self) -> None:
        interval = self.config.queue.cleanup_interval.seconds
        next_cleanup = time.monotonic() + interval
        while True:
            try:
                await self._update_backlog()
                if time.monotonic() >= next_cleanup:
                    next_cleanup = time.monotonic() + interval
                    await self.cleanup()
            except CONNECTION_ERRORS as exc:
                log.warning("cleanup skipped, redis unavailable: %s", exc)
            await asyncio.sleep(min(BACKLOG_EVERY_S, interval))

    async def _update_backlog(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xinfo_groups(self.stream)
        pipe.xlen(self.stream)
        groups, length = await pipe.execute(raise_on_error=False)
        if isinstance(groups, ResponseError):  # no done stream yet: nothing to archive
            BACKLOG.set(0)
            return
        for g in groups:
            if as_str(g["name"]) == self.name:
                BACKLOG.set(group_depth(g, length))

    async def cleanup(self) -> dict[str, int]:
        """Trim every stream of the pipeline below what all its groups acked (the DLQ is kept)."""
        streams = [self.keys.level(lv.name) for lv in self.config.queue.levels]
        streams += [self.keys.dispatch, self.keys.retry, self.keys.done]
        trimmed = {}
        for stream in streams:
            n = await trim_acked(self.redis, stream)
            if n:
                TRIMMED.labels(stream=stream.rsplit(":", 1)[-1]).inc(n)
                trimmed[stream] = n
        return trimmed


async def _copy(conn: psycopg.AsyncConnection[Any], table: str, rows: bytes) -> None:
    async with conn.cursor().copy(f"COPY {table} ({_COLS}) FROM STDIN") as copy:
        await copy.write(rows)
