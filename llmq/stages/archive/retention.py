"""The archive's retention: rows of messages that finished before a cutoff, deleted in batches.

The ``messages`` table keeps every outcome with its request and response, and grows without end unless it
is purged (``llmq-stage db purge``, from cron). Each batch is its own short transaction that skips rows
another session holds (``FOR UPDATE SKIP LOCKED``), so the archive stage goes on writing meanwhile and a
purge stopped halfway has deleted whole batches only. Deleted rows free their space for new rows at the
next (auto)vacuum; the file shrinks only with ``VACUUM FULL`` or ``pg_repack``.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

BATCH = 5000

_DOOMED = "SELECT id FROM messages WHERE finished_at < %s ORDER BY finished_at LIMIT %s FOR UPDATE SKIP LOCKED"
_PURGE = f"WITH doomed AS ({_DOOMED}) DELETE FROM messages m USING doomed WHERE m.id = doomed.id"


async def count_before(conninfo: str, cutoff: datetime) -> int:
    """How many rows finished before ``cutoff``."""
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        row = await (await conn.execute("SELECT count(*) FROM messages WHERE finished_at < %s", (cutoff,))).fetchone()
    return int(row[0]) if row else 0


async def purge_before(conninfo: str, cutoff: datetime, *, batch: int = BATCH) -> int:
    """Delete the rows that finished before ``cutoff``, ``batch`` at a time; return how many were deleted."""
    deleted = 0
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        while True:
            cur = await conn.execute(_PURGE, (cutoff, batch))
            deleted += cur.rowcount
            if cur.rowcount < batch:
                return deleted
