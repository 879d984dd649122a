"""Pausing admission, for maintenance: a paused level keeps taking messages (they wait in its stream) but
the scheduler admits none of them, and nothing is admitted directly; calls already admitted run to their
end. ``llmq-stage pause`` / ``resume`` set and clear it in one hash shared by every scheduler (``keys.paused``:
level name, or ``*`` for every level, to why and since when)."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable

import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys
from llmq.pipeline.runtime.streams import as_str

EVERY = "*"


async def pause(redis: aioredis.Redis, keys: Keys, levels: Iterable[str], reason: str) -> None:
    """Pause ``levels`` (``EVERY``: the whole queue)."""
    stamp = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {reason}".strip()
    await redis.hset(keys.paused, mapping=dict.fromkeys(levels, stamp))


async def resume(redis: aioredis.Redis, keys: Keys, levels: Iterable[str]) -> None:
    await redis.hdel(keys.paused, *levels)


async def read(redis: aioredis.Redis, keys: Keys) -> dict[str, str]:
    """What is paused: level (or ``EVERY``) -> since when and why."""
    raw = await redis.hgetall(keys.paused)
    return {as_str(k): as_str(v) for k, v in raw.items()}


def is_paused(paused: Collection[str], level: str) -> bool:
    """Whether ``level`` is paused, given what is (``read``'s keys)."""
    return level in paused or EVERY in paused
