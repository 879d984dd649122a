"""batch: runs the Batch API's batches (``llmq.pipeline.batches``), from PostgreSQL, restartable at any point.

Each batch that is open moves on at every look (each ``TICK_S``, and at once on a notice from the ingest on
the ``batches`` stream, which this stage consumes), under a row lock taken with SKIP LOCKED, so several
processes share the batches and never work one together:

- ``validating`` -> ``in_progress``: its input file is still there (checked line by line when uploaded).
- ``in_progress``: its lines are queued into its level as the level drains (the level's waiting messages
  kept under ``batches.feed_depth``), each an ordinary message whose id follows from the batch and the line.
  A line fed again after a crash (Redis took it, PostgreSQL did not record how far feeding got) queues
  nothing twice: a message of that id whose status hash is in Redis is not queued again (the submit
  script), and one archived already is not submitted (its hash is kept until its row is committed, so one
  of the two holds). No idempotency record is kept per line: 50,000 of them would hold Redis memory for a
  day. Each carries the batch's deadline, so what has not run when the window ends expires. Its outcomes are
  counted in the archive; all ended, or the window over, it goes on to ``finalizing``.
- ``cancelling``: its queued and retrying messages are cancelled (those in a call finish); it stays
  ``cancelling`` until it is finalized.
- ``finalizing``: once every message fed has its archived outcome, the output and error files are written
  (``output``: OpenAI's line format; ids of their own, replaced if written again after a crash) and the batch
  ends ``completed``, ``expired`` or ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from llmq.pipeline import background, batches, webhooks
from llmq.pipeline.batch_input import URLS, InputLine
from llmq.pipeline.config import Config
from llmq.pipeline.db import migrate
from llmq.pipeline.filestore import CHUNK, Facts, PostgresFileStore
from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.level_status import level_status
from llmq.pipeline.models import FIELD, Message, Outcome, Status, encode
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.stage import Stage
from llmq.pipeline.submit import Submission, Submitter, Verdict, new_message, over_tpm
from llmq.stages.batch.lines import Position, lines_from
from llmq.stages.batch.output import error_line, result_line

log = logging.getLogger("llmq.batch")

TICK_S = 1.0
FEED_MAX = 1000
"""Lines queued per batch per look. A look that queued some and left more to queue is followed by another at
once: a batch is fed as fast as its level drains, not a step a tick."""
FEEDING_TICK_S = 0.1
"""How soon the next look comes while a batch has lines left to feed (its level drains meanwhile)."""
COUNT_EVERY_S = 1.0
"""How often a batch's outcomes are counted in the archive while it is fed (a count reads its rows)."""
CANCEL_AT_ONCE = 500

OPEN_BATCHES = Gauge("llmq_batches_open", "Batches not yet ended, by status", ["status"])
ENDED = Counter("llmq_batches_ended_total", "Batches ended, by final status", ["status"])
FED = Counter("llmq_batch_lines_fed_total", "Lines of batches queued into their level", ["level"])

_line = msgspec.json.Decoder(InputLine)
_UNREACHABLE = (*UNAVAILABLE, psycopg.OperationalError, OSError, TimeoutError)


class BatchStage(Stage):
    def __init__(
        self, *, config: Config, redis: aioredis.Redis, keys: Keys, pool: AsyncConnectionPool, conninfo: str
    ) -> None:
        self.name = Group.BATCH.value
        self.stream = keys.batches
        self.config = config
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.conninfo = conninfo
        self.files = PostgresFileStore(pool)
        self.submitter = Submitter(config, redis=redis, keys=keys)
        self.feed_depth = config.batches.feed_depth
        self.wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._feeding = False
        """A batch has lines left to feed: the next look comes after ``FEEDING_TICK_S``."""
        self._counted: dict[str, float] = {}
        """Batch id -> when (monotonic) its outcomes were last counted."""

    async def start(self) -> None:
        await self.pool.open(wait=False)
        self._loop = asyncio.create_task(self._run(), name="batches")

    async def close(self) -> None:
        await background.cancel(self._loop)
        await self.pool.close()

    async def handle(self, batch: Batch) -> None:
        """A notice: look at the batches now."""
        for entry in batch.entries:
            batch.ack(entry)
        self.wake.set()

    async def _run(self) -> None:
        migrated = False
        while True:
            try:
                if not migrated:  # (PostgreSQL down at start: tried again each tick, as the archive does)
                    await migrate(self.conninfo)
                    migrated = True
                await self.look()
            except _UNREACHABLE as exc:
                log.warning("batches paused: %s", exc)
            except Exception:  # a loop boundary: batches must go on being run
                log.error("running the batches failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), FEEDING_TICK_S if self._feeding else TICK_S)
            self.wake.clear()

    async def look(self) -> None:
        """Move every open batch on by one step."""
        self._feeding = False
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, status FROM batches WHERE status = ANY(%s) ORDER BY created_at", (list(batches.OPEN),)
            )
            open_now = await cur.fetchall()
        for status in batches.OPEN:
            OPEN_BATCHES.labels(status=status).set(sum(1 for _, s in open_now if s == status))
        if not open_now:
            return
        room = {lv.level: self.feed_depth - lv.depth for lv in await level_status(self.redis, self.keys, self.config)}
        for batch_id, _ in open_now:
            try:
                await self.step(batch_id, room)
            except _UNREACHABLE:
                raise
            except Exception:  # a boundary per batch: one that cannot move on holds up no other
                log.error("batch %s could not move on", batch_id, exc_info=True)

    async def step(self, batch_id: str, room: dict[str, int]) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT " + ", ".join(f.name for f in batches.COLUMNS) + " FROM batches WHERE id = %s"
                " AND status = ANY(%s) FOR UPDATE SKIP LOCKED",
                (batch_id, list(batches.OPEN)),
            )
            row = await cur.fetchone()
            if row is None:  # another process has it now, or it ended
                return
            b = batches.row_to_batch(row)
            if b.status == "validating":
                await self._validate(conn, b)
            elif b.status == "in_progress":
                await self._progress(conn, b, room)
            elif b.status == "cancelling" and not b.cancel_pass:
                await self._cancel(conn, b)
            else:  # finalizing, or cancelling once its queued messages were cancelled
                await self._finalize(conn, b)

    async def _validate(self, conn: Any, b: batches.Batch) -> None:
        if await self.files.get(b.input_file_id) is None:
            error = {"code": "file_not_found", "message": f"input file {b.input_file_id} was deleted", "param": None}
            await conn.execute(
                "UPDATE batches SET status = 'failed', failed_at = now(), errors = %s WHERE id = %s",
                (Jsonb([error | {"line": None}]), b.id),
            )
            ENDED.labels(status="failed").inc()
            await self._announce(b, "failed", 0, 0, None, None)
            return
        await conn.execute("UPDATE batches SET status = 'in_progress', in_progress_at = now() WHERE id = %s", (b.id,))
        self.wake.set()  # its first lines go now, not a tick later

    async def _progress(self, conn: Any, b: batches.Batch, room: dict[str, int]) -> None:
        completed, failed = b.completed, b.failed
        if b.fed == b.total or time.monotonic() - self._counted.get(b.id, 0.0) >= COUNT_EVERY_S:
            completed, failed = await _counts(conn, b.id)
            self._counted[b.id] = time.monotonic()
        if datetime.now(UTC) >= b.expires_at:
            await conn.execute(
                "UPDATE batches SET status = 'finalizing', finalizing_at = now(), expired_at = now(),"
                " completed = %s, failed = %s WHERE id = %s",
                (completed, failed, b.id),
            )
            log.info("batch %s: its completion window ended with %d of %d lines fed", b.id, b.fed, b.total)
            return
        fed, at = b.fed, Position(b.feed_chunk, b.feed_offset)
        if fed < b.total:
            fed, at = await self._feed(b, room)
            self._feeding = True
            if b.fed < fed < b.total:  # its level took lines and has more room, maybe: look again at once
                self.wake.set()
        done = fed == b.total and completed + failed >= b.total
        await conn.execute(
            "UPDATE batches SET fed = %s, feed_chunk = %s, feed_offset = %s, completed = %s, failed = %s,"
            " status = CASE WHEN %s THEN 'finalizing' ELSE status END,"
            " finalizing_at = CASE WHEN %s THEN now() ELSE finalizing_at END WHERE id = %s",
            (fed, at.chunk, at.offset, completed, failed, done, done, b.id),
        )
        if done:
            self._counted.pop(b.id, None)
            self.wake.set()

    async def _feed(self, b: batches.Batch, room: dict[str, int]) -> tuple[int, Position]:
        """Queue the batch's next lines, as many as its level has room for, in order; how far it got. What is
        queued is always the lines before ``fed`` (and, after a crash, lines of the look that was not
        recorded, at most ``FEED_MAX`` past it: cancel and finalize look there too)."""
        at = Position(b.feed_chunk, b.feed_offset)
        space = min(room.get(b.level, 0), FEED_MAX)
        if space <= 0:
            return b.fed, at
        lines: list[tuple[Message, Position]] = []
        deadline = b.expires_at.timestamp()
        async for line in lines_from(self.files, b.input_file_id, at):
            item = _line.decode(line.data)  # checked when uploaded
            msg = new_message(
                message_id=batches.message_id(b.id, b.fed + len(lines)),
                level=b.level,
                request=item.body,
                tenant=b.tenant,
                endpoint=URLS[item.url],
            )
            lines.append(
                (msgspec.structs.replace(msg, deadline=deadline, batch_id=b.id, custom_id=item.custom_id), line.after)
            )
            if len(lines) >= space:
                break
        archived = await self._archived([m.id for m, _ in lines])
        taken = await self._queue([m for m, _ in lines if m.id not in archived], b.tenant)
        accepted = 0
        for msg, _ in lines:
            if msg.id not in archived and msg.id not in taken:  # the level is full or the tenant over a quota
                break
            accepted += 1
        room[b.level] = room.get(b.level, 0) - accepted
        FED.labels(level=b.level).inc(accepted)
        return b.fed + accepted, lines[accepted - 1][1] if accepted else at

    async def _queue(self, messages: list[Message], tenant: str | None) -> set[str]:
        """Queue ``messages`` in order up to the first one refused (the level full, the tenant over a quota);
        the ids queued. One that can never pass its tenant's tpm (its estimate alone is more) ends failed
        now, as the API refuses it, instead of holding the batch until its window ends."""
        taken: set[str] = set()
        one_by_one = self.config.tenant(tenant).tpm is not None
        # Without a tpm quota a refusal holds for every later message of the call (the level's depth, the
        # tenant's max_queued and rpm only grow within it): one call, its refused ones the tail. A tpm
        # quota refuses by size, so a smaller message could pass one refused before it: one at a time.
        pending: list[Message] = []
        for msg in messages:
            if why := over_tpm(self.config, msg):
                if pending and not await self._submit(pending, taken):
                    return taken
                pending = []
                failed = Outcome(message=msg, status=Status.FAILED, error=why, finished_at=time.time())
                await self.redis.xadd(self.keys.done, {FIELD: encode(failed)})
                taken.add(msg.id)
                continue
            pending.append(msg)
            if one_by_one:
                if not await self._submit(pending, taken):
                    return taken
                pending = []
        if pending:
            await self._submit(pending, taken)
        return taken

    async def _submit(self, messages: list[Message], taken: set[str]) -> bool:
        """Submit ``messages``; add those queued to ``taken``; whether all were."""
        verdicts = await self.submitter.submit_many([Submission(message=m, payload=encode(m)) for m in messages])
        for msg, verdict in zip(messages, verdicts, strict=True):
            if verdict.verdict is not Verdict.QUEUED:
                return False
            taken.add(msg.id)
        return True

    async def _archived(self, ids: list[str]) -> set[str]:
        """Of these messages, those with an archived row (they ran: a line fed again must not run again)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT id::text FROM messages WHERE id = ANY(%s::uuid[])", (ids,))
            return {row[0] for row in await cur.fetchall()}

    def _unrecorded(self, b: batches.Batch) -> list[str]:
        """The ids of the lines a look may have queued without recording it (it crashed before its commit)."""
        return [batches.message_id(b.id, i) for i in range(b.fed, min(b.total, b.fed + FEED_MAX))]

    async def _cancel(self, conn: Any, b: batches.Batch) -> None:
        """Cancel what it queued and has not reached a backend; what has ends as it does."""
        ids = [batches.message_id(b.id, i) for i in range(b.fed)] + self._unrecorded(b)
        for start in range(0, len(ids), CANCEL_AT_ONCE):
            await asyncio.gather(*(self.submitter.cancel(mid) for mid in ids[start : start + CANCEL_AT_ONCE]))
        await conn.execute("UPDATE batches SET cancel_pass = true WHERE id = %s", (b.id,))
        log.info("batch %s cancelled after %d of %d lines fed", b.id, b.fed, b.total)
        self.wake.set()

    async def _finalize(self, conn: Any, b: batches.Batch) -> None:
        """Once every message of the batch has ended and has its row: write its files and end it."""
        completed, failed = await _counts(conn, b.id)
        unrecorded = self._unrecorded(b)
        pipe = self.redis.pipeline(transaction=False)
        for mid in unrecorded:
            pipe.hget(self.keys.msg(mid), "status")
        live = {mid for mid, status in zip(unrecorded, await pipe.execute(), strict=True) if status is not None}
        fed_ids = [batches.message_id(b.id, i) for i in range(b.fed)]
        archived = await self._archived(fed_ids + unrecorded)
        if not archived.issuperset(fed_ids) or live - archived:
            # outcomes still on their way (running, retrying, or not archived yet)
            await conn.execute(
                "UPDATE batches SET completed = %s, failed = %s WHERE id = %s", (completed, failed, b.id)
            )
            return
        final = "cancelled" if b.cancelling_at else "expired" if b.expired_at else "completed"
        ran = archived.intersection(unrecorded)
        output_id = await self._write(b, "output") if completed else None
        error_id = await self._write(b, "error", unfed=final, ran=ran) if completed < b.total else None
        await conn.execute(
            f"UPDATE batches SET status = %s, {final}_at = coalesce({final}_at, now()), completed = %s, failed = %s,"
            " output_file_id = %s, error_file_id = %s WHERE id = %s",
            (final, completed, b.total - completed, output_id, error_id, b.id),
        )
        ENDED.labels(status=final).inc()
        await self._announce(b, final, completed, b.total - completed, output_id, error_id)
        log.info("batch %s %s: %d of %d lines completed", b.id, final, completed, b.total)

    async def _announce(
        self, b: batches.Batch, status: str, completed: int, failed: int, output: str | None, errors: str | None
    ) -> None:
        """The batch's event for its webhook, if it has one: before its end is committed, so a crash between
        sends it again (the same webhook-id: a receiver drops the repeat) rather than never."""
        url = webhooks.url_of(self.config, b.metadata, b.tenant) if self.config.webhooks.endpoints else None
        if url is None:
            return
        data = {
            "id": b.id,
            "status": status,
            "request_counts": {"total": b.total, "completed": completed, "failed": failed},
            "output_file_id": output,
            "error_file_id": errors,
            "metadata": b.metadata,
        }
        delivery = webhooks.event("batch", b.id, f"batch.{status}", data, url)
        await self.redis.xadd(self.keys.webhooks, {FIELD: webhooks.encode(delivery)})

    async def _write(self, b: batches.Batch, kind: str, *, unfed: str = "", ran: set[str] | None = None) -> str:
        """Write the batch's output (``kind`` output) or error file; its id. Lines from ``fed`` on are
        listed as never run (``unfed``: cancelled, expired), but those of ``ran`` (their row is there)."""
        stored = await self.files.put(
            purpose="batch_output",
            filename=f"{b.id}_{kind}.jsonl",
            tenant=b.tenant,
            pieces=self._pieces(b, kind, unfed, ran or set()),
            facts=Facts,
            file_id=f"file-{b.id.removeprefix('batch_')}-{kind}",
        )
        return stored.id

    async def _pieces(self, b: batches.Batch, kind: str, unfed: str, ran: set[str]) -> AsyncIterator[bytes]:
        held = bytearray()
        sql = (
            "SELECT custom_id, id::text, status, response::text, error FROM messages WHERE batch_id = %s AND "
            + ("status = 'completed'" if kind == "output" else "status <> 'completed'")
            + " ORDER BY custom_id"
        )
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(name=f"batch_{kind}")  # on the server: the rows come a page at a time
            await cursor.execute(sql, (b.id,))
            async for custom_id, mid, status, response, error in cursor:
                if kind == "output":
                    held += result_line(custom_id, mid, response or "null")
                else:
                    held += error_line(custom_id, mid, status, error or status)
                if len(held) >= CHUNK:
                    yield bytes(held)
                    held.clear()
        if unfed in ("cancelled", "expired"):
            index = b.fed
            async for line in lines_from(self.files, b.input_file_id, Position(b.feed_chunk, b.feed_offset)):
                why = "cancelled" if unfed == "cancelled" else "reached the end of its completion window"
                mid = batches.message_id(b.id, index)
                index += 1
                if mid in ran:  # queued by a look not recorded, and ran: its row is listed above
                    continue
                custom_id = _line.decode(line.data).custom_id
                held += error_line(custom_id, mid, f"batch_{unfed}", f"the batch {why} before this ran")
                if len(held) >= CHUNK:
                    yield bytes(held)
                    held.clear()
        if held:
            yield bytes(held)


async def _counts(conn: Any, batch_id: str) -> tuple[int, int]:
    """The batch's requests archived completed, and archived otherwise."""
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status <> 'completed')"
        " FROM messages WHERE batch_id = %s",
        (batch_id,),
    )
    row = await cur.fetchone()
    return int(row[0]), int(row[1])
