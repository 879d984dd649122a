"""Reading the PostgreSQL archive in a test."""

from __future__ import annotations

import psycopg


async def status_in_db(dsn: str, mid: str, status: str) -> bool:
    """The message is archived with this status (False while the table does not exist yet)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        try:
            row = await (await conn.execute("SELECT status FROM messages WHERE id = %s", (mid,))).fetchone()
        except psycopg.errors.UndefinedTable:
            return False
    return row is not None and row[0] == status
