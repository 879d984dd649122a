"""archive: write every terminal outcome to PostgreSQL (and, in ``cleanup``, keep the streams trimmed).

Each batch of ``done`` entries becomes one transaction: a COPY straight into ``messages`` (rows
formatted by ``llmq.stages.archive.rows``), or, when an id is there already, a COPY into a temporary table
and INSERT … ON CONFLICT (id) DO UPDATE, which never replaces a row with an older outcome (a late
redelivery after the message was replayed and completed). Entries are acked only after the commit, so a
crash redelivers them and the upsert makes the rows come out the same. While PostgreSQL is down or
unreachable, the batch is retried with backoff (nothing acked, health "degraded", ``llmq_archive_backlog``
growing) until it lands.

When PostgreSQL refuses a batch for what a row holds (a value out of range, a constraint), no retry would
cure it: the batch is halved until each refused row stands alone, every other row is archived, and each
refused one is dead-lettered with the database's reason, acked in the same Redis transaction and counted
in ``llmq_poison_total{stage="archive"}``. ``llmq-stage dlq replay`` puts it back into ``done`` once the
cause is fixed. An entry that is not an outcome at all is dead-lettered the same way.

A message archived keeps its status hash in Redis only for ``queue.archived_retention``: Redis holds what
is in flight plus that window. The stage's housekeeping (trimming streams, bounding the dead letters) is
in ``cleanup``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from llmq.pipeline import background, dlq, metrics, transitions, webhooks
from llmq.pipeline.config import Config
from llmq.pipeline.db import migrate
from llmq.pipeline.errors import GiveBack
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import Outcome, decode_outcome
from llmq.pipeline.runtime import effects
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.stage import Stage
from llmq.pipeline.runtime.streams import Entry
from llmq.stages.archive.cleanup import GROUP, Cleanup
from llmq.stages.archive.rows import COLUMNS, copy_row

log = logging.getLogger("llmq.archive")

ARCHIVED = Counter("llmq_archived_total", "Outcomes committed to PostgreSQL", ["status"])
BATCH_SECONDS = Histogram(
    "llmq_archive_batch_seconds",
    "Time to write one batch to PostgreSQL",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

_COLS = ", ".join(COLUMNS)
_UPDATE = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "id")
IN_FLIGHT_BATCHES = 3
BATCH_WINDOW_S = 1.0
"""How long a batch's archived message keeps its status hash: 50,000 results kept a minute each would make
Redis memory grow with the batch instead of with what is in flight."""
DB_ERRORS = (psycopg.OperationalError, psycopg.errors.AdminShutdown, PoolTimeout)
REFUSED_SQLSTATE_CLASSES = ("22", "23", "54")
"""SQLSTATE classes of errors about what the rows hold, which no retry cures: data exception (a value out
of range, text the type cannot take), integrity constraint violation, program limit exceeded (a value too
large; psycopg counts this class among its OperationalErrors)."""


@dataclass(frozen=True, slots=True)
class _Row:
    """One message's row of a batch: its newest outcome, formatted."""

    outcome: Outcome
    entry: Entry
    """The entry that carried ``outcome``."""
    superseded: list[Entry]
    """Entries of the same message with older outcomes: settled with the row, never written."""
    data: bytes


class Archive(Stage):
    def __init__(
        self, *, config: Config, redis: aioredis.Redis, keys: Keys, pool: AsyncConnectionPool, conninfo: str
    ) -> None:
        self.name = GROUP
        self.stream = keys.done
        self.config = config
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.conninfo = conninfo
        pg = config.database.postgres
        self.store_bodies = pg.store_bodies if pg else True
        self.window_s = max(1, int(config.queue.archived_retention.seconds))
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
        cleanup = Cleanup(config=self.config, redis=self.redis, keys=self.keys)
        self._cleanup = asyncio.create_task(cleanup.run(), name="cleanup")

    async def close(self) -> None:
        await background.cancel(self._cleanup)
        await self.pool.close()

    def on_stop(self) -> None:
        self._stopping.set()

    async def health(self) -> dict[str, str]:
        return {"postgres": "ok" if self.db_ok else "degraded"}

    async def handle(self, batch: Batch) -> None:
        """Idempotent: rows are upserted by message id and never replaced by an older outcome, so a
        redelivered batch writes the same rows (and dead-letters the same refused ones)."""
        newest: dict[str, tuple[Outcome, Entry]] = {}
        superseded: dict[str, list[Entry]] = collections.defaultdict(list)
        for entry in batch.entries:
            try:
                outcome = decode_outcome(entry.data)
            except msgspec.DecodeError as exc:
                dead_letter(batch, self.keys, entry, f"not an outcome: {exc}", message_id=None)
                continue
            mid = outcome.message.id
            # One row per id per statement: the newest outcome (of equals, the later entry), as the upsert would.
            kept = newest.get(mid)
            if kept is not None and outcome.finished_at < kept[0].finished_at:
                superseded[mid].append(entry)
                continue
            if kept is not None:
                superseded[mid].append(kept[1])
            newest[mid] = (outcome, entry)
        # Sorted by id, so concurrent batches lock conflicting rows in the same order (no deadlock).
        rows = [
            _Row(o, e, superseded[mid], copy_row(o, store_bodies=self.store_bodies))
            for mid, (o, e) in sorted(newest.items())
        ]
        started = time.perf_counter()
        await self._archive(batch, rows)
        BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _archive(self, batch: Batch, rows: list[_Row]) -> None:
        """Write the rows and ack their entries. When PostgreSQL refuses them for what a row holds, each
        half is written on its own, down to single rows, so every row it accepts is archived and each one it
        refuses is dead-lettered alone (one bad row of 100 costs about 14 more statements)."""
        try:
            async for attempt in self._retrying():
                with attempt:
                    await self._write(b"".join([r.data for r in rows]))
        except psycopg.Error as exc:
            if not _refused(exc):
                raise
            if len(rows) > 1:
                half = len(rows) // 2
                await self._archive(batch, rows[:half])
                await self._archive(batch, rows[half:])
                return
            [row] = rows
            reason = f"refused by PostgreSQL: {exc.diag.message_primary or exc}"
            dead_letter(batch, self.keys, row.entry, reason, message_id=row.outcome.message.id)
        else:
            for status, n in collections.Counter(r.outcome.status for r in rows).items():
                ARCHIVED.labels(status=status.value).inc(n)
            for row in rows:
                # PostgreSQL has it now: Redis keeps the status only for a short window (reads fall back); a
                # batch's message for a second (its result goes to the batch's output file, from the archive)
                msg = row.outcome.message
                window_s = min(self.window_s, BATCH_WINDOW_S) if msg.batch_id else self.window_s
                batch.ack(row.entry, transitions.shortened(self.keys, msg, window_s), *self._webhook(row.outcome))
        for row in rows:
            for entry in row.superseded:
                batch.ack(entry)

    def _webhook(self, outcome: Outcome) -> list[effects.Effect]:
        """The event of a message that ended, for its webhook if it has one (a batch's lines have their batch's)."""
        msg = outcome.message
        if not self.config.webhooks.endpoints or msg.batch_id:
            return []
        url = webhooks.url_of(self.config, msg.metadata, msg.tenant)
        if url is None:
            return []
        return [effects.xadd(self.keys.webhooks, webhooks.encode(webhooks.message_event(outcome, url)))]

    async def _write(self, rows: bytes) -> None:
        """COPY the rows straight into ``messages``, each row written once. When an id is there already (a
        redelivered batch, a replayed dead letter), that transaction rolls back and the batch is upserted
        through a temporary table instead, each row only over an outcome that is not newer."""
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
                        " WHERE messages.finished_at <= EXCLUDED.finished_at"
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
            if await background.wait_event(self._stopping, seconds):
                raise GiveBack  # the batch stays pending and is re-read after the restart

        return AsyncRetrying(
            retry=retry_if_exception(_unavailable),
            wait=wait_exponential_jitter(multiplier=0.2, max=10, jitter=0.2),
            before_sleep=failed,
            sleep=wait_unless_stopping,
        )


def dead_letter(batch: Batch, keys: Keys, entry: Entry, reason: str, *, message_id: str | None) -> None:
    """Move one entry of the batch to the dead-letter stream with the reason, acked in the batch's commit.
    ``llmq-stage dlq`` lists, shows and replays it (an outcome goes back into ``done``)."""
    fields: dict[bytes, Any] = {b"group": GROUP, b"entry_id": entry.id}
    letter = dlq.dead_letter(
        keys, payload=entry.data, message_id=message_id, reason=reason, source=keys.done, fields=fields
    )
    batch.ack(entry, letter)
    metrics.POISON.labels(stage=GROUP).inc()
    log.error(
        "dead-lettered entry %s: %s",
        entry.id,
        reason,
        extra={"stage": GROUP, "entry_id": entry.id, "message_id": message_id},
    )


def _refused(exc: BaseException) -> bool:
    """PostgreSQL refused the statement for what its rows hold."""
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "")[:2] in REFUSED_SQLSTATE_CLASSES


def _unavailable(exc: BaseException) -> bool:
    """PostgreSQL is down, unreachable or shutting down: the same statement may pass later."""
    return isinstance(exc, DB_ERRORS) and not _refused(exc)


async def _copy(conn: psycopg.AsyncConnection[Any], table: str, rows: bytes) -> None:
    async with conn.cursor().copy(f"COPY {table} ({_COLS}) FROM STDIN") as copy:
        await copy.write(rows)
