"""Trim streams without losing work.

MAXLEN trimming deletes entries that are still pending (Redis 7 has no "acked only" trim). The safe point
of a stream is the lowest of, over every group: its oldest pending entry, or, when it has none, the entry
after the last one delivered to it. XTRIM MINID below that point removes only entries every group acked.
A stream with no group is left alone: nothing has consumed it yet.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llmq.pipeline.runtime.streams import as_str


def _after(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


async def safe_trim_point(redis: aioredis.Redis, stream: str) -> str | None:
    """The lowest id any group still needs, or None when the stream has no group (or does not exist)."""
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:
        return None
    if not groups:
        return None
    points = []
    for group in groups:
        name = as_str(group["name"])
        if int(group["pending"]):
            summary: Any = await redis.xpending(stream, name)
            if summary["min"] is not None:
                points.append(as_str(summary["min"]))
                continue
            # acked since XINFO answered: what it had delivered by then is all acked, and what it delivered
            # since comes after that
        points.append(_after(as_str(group["last-delivered-id"])))
    return min(points, key=lambda p: tuple(int(x) for x in p.split("-")))


async def trim_acked(redis: aioredis.Redis, stream: str) -> int:
    """Delete the entries every group has acked; return how many."""
    point = await safe_trim_point(redis, stream)
    if point is None:
        return 0
    return int(await redis.xtrim(stream, minid=point, approximate=False))
