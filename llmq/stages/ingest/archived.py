"""Reading a message from the PostgreSQL archive, once Redis no longer holds its status hash.

The archive stage writes the ``messages`` table (``llmq.stages.archive.rows``); this is its one reader in
the API, by primary key.
"""

from __future__ import annotations

import uuid

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from llmq.stages.ingest import schema
from llmq.stages.ingest.http_api import ArchiveUnavailable

_SELECT = (
    "SELECT status, level, attempts, backend, extract(epoch FROM enqueued_at),"
    " extract(epoch FROM started_at), extract(epoch FROM finished_at), response::text, error, errors::text,"
    " first_token_ms FROM messages WHERE id = %s"
)


async def read_archived(pool: AsyncConnectionPool, message_id: str) -> schema.MessageView | None:
    """The archived message, None when there is none; ArchiveUnavailable when PostgreSQL cannot answer."""
    try:
        key = uuid.UUID(message_id)  # the primary key's type: compared as text, no index would serve
    except ValueError:
        return None
    try:
        async with pool.connection(timeout=2) as conn:
            cur = await conn.execute(_SELECT, (key,))
            row = await cur.fetchone()
    except (psycopg.Error, OSError, TimeoutError):
        raise ArchiveUnavailable from None
    if row is None:
        return None
    status, level, attempts, backend, enq, started, finished, response, error, errors, first_token_ms = row
    return schema.MessageView(
        id=message_id,
        status=status,
        level=level,
        attempts=attempts,
        backend=backend,
        enqueued_at=float(enq),
        started_at=float(started) if started else None,
        finished_at=float(finished),
        result=msgspec.Raw(response.encode()) if response is not None else None,
        error=error,
        errors=schema.error_lines(errors),
        first_token_ms=first_token_ms,
    )
