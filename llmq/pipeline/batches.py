"""Batches of OpenAI's Batch API (``/v1/batches``): the ``batches`` table (migration 0005), how a batch looks
to a client, and the ids of its messages.

The ingest creates a batch (``validating``) and asks for its cancel (``cancelling``); the batch stage
(``llmq.stages.batch``) does the rest: ``in_progress`` while it feeds the input's lines into the batch's level
and counts their outcomes in the archive, ``finalizing`` while it writes the output and error files, then
``completed``, ``failed``, ``expired`` (the completion window ended first) or ``cancelled``.

A line's message id follows from the batch and the line (``message_id``), and its idempotency key too, so
feeding a line again after a restart queues nothing twice.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

OPEN = ("validating", "in_progress", "finalizing", "cancelling")
ENDED = ("completed", "failed", "expired", "cancelled")
METADATA_MAX = 16
_IDS = uuid.UUID("5d8f2f0e-6a3c-4f51-9d3e-6c6c6d710001")
"""The namespace of the batch messages' ids (UUIDv5)."""


def new_batch_id() -> str:
    return "batch_" + os.urandom(12).hex()


def message_id(batch_id: str, index: int) -> str:
    """The id of the message of a batch's ``index``-th request (from 0), the same each time it is fed."""
    return str(uuid.uuid5(_IDS, f"{batch_id}:{index}"))


class Batch(msgspec.Struct, kw_only=True):
    """A row of ``batches``."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    level: str
    tenant: str | None
    metadata: dict[str, str] | None
    total: int
    fed: int
    feed_chunk: int
    feed_offset: int
    completed: int
    failed: int
    cancel_pass: bool
    """A cancelling batch's queued messages were cancelled: it waits for the rest to end."""
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]] | None
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None
    finalizing_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    expired_at: datetime | None
    cancelling_at: datetime | None
    cancelled_at: datetime | None


COLUMNS = tuple(msgspec.structs.fields(Batch))
_SELECT = "SELECT " + ", ".join(f.name for f in COLUMNS) + " FROM batches"
_TIMES = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def row_to_batch(row: tuple[Any, ...]) -> Batch:
    return Batch(**{f.name: value for f, value in zip(COLUMNS, row, strict=True)})


def batch_object(b: Batch) -> dict[str, Any]:
    """The batch as OpenAI's API describes it."""
    doc: dict[str, Any] = {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": {"object": "list", "data": b.errors} if b.errors else None,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.metadata,
    }
    for name in _TIMES:
        at: datetime | None = getattr(b, name)
        doc[name] = int(at.timestamp()) if at is not None else None
    return doc


async def insert(
    conn: AsyncConnection[Any],
    *,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    window_s: float,
    level: str,
    tenant: str | None,
    metadata: dict[str, str] | None,
    total: int,
) -> Batch:
    cur = await conn.execute(
        "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, level, tenant, metadata,"
        " total, expires_at) VALUES (%s, %s, %s, %s, 'validating', %s, %s, %s, %s,"
        " now() + make_interval(secs => %s)) RETURNING " + ", ".join(f.name for f in COLUMNS),
        (
            new_batch_id(),
            endpoint,
            input_file_id,
            completion_window,
            level,
            tenant,
            Jsonb(metadata) if metadata is not None else None,
            total,
            window_s,
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    return row_to_batch(row)


async def get(pool: AsyncConnectionPool, batch_id: str) -> Batch | None:
    async with pool.connection() as conn:
        row = await (await conn.execute(_SELECT + " WHERE id = %s", (batch_id,))).fetchone()
    return row_to_batch(row) if row else None


async def page(
    pool: AsyncConnectionPool, *, tenant: str | None, every_tenant: bool, after: str | None, limit: int
) -> list[Batch]:
    """Batches, newest first, after the one named (``after``), at most ``limit``."""
    where, args = ["TRUE"], []
    if not every_tenant:
        where.append("tenant IS NOT DISTINCT FROM %s")
        args.append(tenant)
    if after is not None:
        where.append("(created_at, id) < (SELECT created_at, id FROM batches WHERE id = %s)")
        args.append(after)
    sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT %s"
    async with pool.connection() as conn:
        rows = await (await conn.execute(sql.encode(), (*args, limit))).fetchall()
    return [row_to_batch(r) for r in rows]


async def request_cancel(pool: AsyncConnectionPool, batch_id: str) -> Batch | None:
    """Mark an open batch ``cancelling`` (the batch stage stops it); the batch as it is now."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = now()"
            " WHERE id = %s AND status IN ('validating', 'in_progress')",
            (batch_id,),
        )
        row = await (await conn.execute(_SELECT + " WHERE id = %s", (batch_id,))).fetchone()
    return row_to_batch(row) if row else None


async def uses_file(conn: AsyncConnection[Any], file_id: str) -> bool:
    """Whether an open batch reads the file (it may not be deleted meanwhile)."""
    cur = await conn.execute(
        "SELECT 1 FROM batches WHERE input_file_id = %s AND status = ANY(%s) LIMIT 1", (file_id, list(OPEN))
    )
    return await cur.fetchone() is not None
