"""Pausing admission, for maintenance: a paused level keeps taking messages (they wait in its stream) but
the scheduler admits none of them, and nothing is admitted directly; calls already admitted run to their
end. ``llmq-stage pause`` / ``resume`` set and clear it in one hash shared by every scheduler (``keys.paused``:
level name, or ``*`` for every level, to why and since when)."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable

import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys

EVERY = "*"


async def pause(redis: aioredis.Redis, keys: Keys, levels: Iterable[str], reason: str) -> None:
    """Pause ``levels`` (``EVERY``: the whole queue)."""
    stamp = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {reason}".strip()
    await redis.hset(keys.paused, mapping=dict.fromkeys(levels, stamp))


async def resume(redis: aioredis.Redis, keys: Keys, levels: Iterable[str]) -> None:
    await redis.hdel(keys.paused, *levels)


async def resume_all(redis: aioredis.Redis, keys: Keys) -> None:
    """Clear every pause, whatever its field holds."""
    await redis.delete(keys.paused)


def names(raw: Iterable[bytes]) -> set[str]:
    """The paused hash's fields as text: a field that is no UTF-8 (written by hand) never stops a reader."""
    return {f.decode(errors="replace") for f in raw}


async def read(redis: aioredis.Redis, keys: Keys) -> dict[str, str]:
    """What is paused: level (or ``EVERY``) -> since when and why."""
    raw: dict[bytes, bytes] = await redis.hgetall(keys.paused)  # type: ignore[assignment]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}


def is_paused(paused: Collection[str], level: str) -> bool:
    """Whether ``level`` is paused, given what is (``read``'s keys)."""
    return level in paused or EVERY in paused
