"""Checks that a pipeline run has finished: outcomes archived, every group's entries acked."""

from __future__ import annotations

import psycopg
import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys

LEVELS = ("realtime", "high", "normal", "low")


async def archived_rows(database_url: str) -> int:
    """Rows in the archive's ``messages`` table (0 before the archive created it)."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        try:
            cur = await conn.execute("SELECT count(*) FROM messages")
        except psycopg.errors.UndefinedTable:
            return 0
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def groups_settled(redis: aioredis.Redis, keys: Keys) -> bool:
    """True when no group of any stream has an entry pending or not yet delivered."""
    for stream in [*(keys.level(level) for level in LEVELS), keys.dispatch, keys.retry, keys.done]:
        for group in await redis.xinfo_groups(stream):
            if group["pending"] or group["lag"]:
                return False
    return True


async def describe_streams(redis: aioredis.Redis, keys: Keys, database_url: str) -> str:
    """Where the messages are, for a failing test's message."""
    lines = []
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        try:
            cur = await conn.execute("SELECT status, count(*) FROM messages GROUP BY status")
            lines.append(f"archived: {await cur.fetchall()}")
        except psycopg.errors.UndefinedTable:
            lines.append("archived: no table yet")
    for stream in [*(keys.level(level) for level in LEVELS), keys.dispatch, keys.retry, keys.done]:
        lines.append(f"{stream}: length {await redis.xlen(stream)}, groups {await redis.xinfo_groups(stream)}")
    return "\n".join(lines)
