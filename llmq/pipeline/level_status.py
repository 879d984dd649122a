"""Read-only views of the queue: per-level depth, pending, consumers and oldest age.

Shared by the ingest API (``/api/v1/queues/status``) and ``llmq-stage status``. Depth is lag + pending
of the consuming group (XINFO GROUPS ``lag`` ignores pending entries); before any consumer exists the
whole stream is waiting.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llmq.pipeline.config import Config
from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.pausing import is_paused, names
from llmq.pipeline.runtime.streams import as_str

SCHEDULE_GROUP = Group.SCHEDULE.value
"""The consumer group that reads the level streams."""


class LevelStatus(msgspec.Struct, kw_only=True):
    level: str
    priority: int
    depth: int
    """Messages not yet acked by the scheduler: lag + pending."""
    pending: int
    """Delivered to a scheduler, not yet acked."""
    consumers: int
    inflight: int
    """Admitted for dispatch and not finished."""
    oldest_age_s: float | None
    """Age of the oldest message not yet acked; None when the level is empty."""
    max_size: int
    max_wait_time_s: float
    paused: bool = False
    """Its admission is paused (``llmq-stage pause``): messages wait, none is admitted."""


def group_depth(group: Mapping[str, Any], length: int) -> int:
    """Entries a consumer group has not acked: pending + lag. Redis cannot compute lag after deletions in
    the group's range (trims); then the whole stream length counts, erring high rather than low."""
    lag = group.get("lag")
    return int(group["pending"]) + (int(lag) if lag is not None else int(length))


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


async def level_status(redis: aioredis.Redis, keys: Keys, config: Config) -> list[LevelStatus]:
    pipe = redis.pipeline(transaction=False)
    for level in config.queue.levels:
        stream = keys.level(level.name)
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        pipe.xrange(stream, count=1)
        pipe.zcount(keys.inflight(level.name), time.time(), "+inf")
    pipe.hgetall(keys.paused)
    replies = await pipe.execute(raise_on_error=False)
    paused = names(replies.pop())
    now_ms = time.time() * 1000
    out = []
    for i, level in enumerate(config.queue.levels):
        length, groups, first, inflight = replies[4 * i : 4 * i + 4]
        if isinstance(groups, ResponseError):  # no such stream yet
            groups = []
        group = next((g for g in groups if as_str(g["name"]) == SCHEDULE_GROUP), None)
        if group is None:
            depth, pending, consumers = int(length), 0, 0
            oldest = as_str(first[0][0]) if first else None
        else:
            pending, consumers = int(group["pending"]), int(group["consumers"])
            depth = group_depth(group, length)
            oldest = await _oldest_unacked(redis, keys.level(level.name), group, pending)
        out.append(
            LevelStatus(
                level=level.name,
                priority=level.priority,
                depth=depth,
                pending=pending,
                consumers=consumers,
                inflight=int(inflight),
                oldest_age_s=None if oldest is None else round(max(0.0, now_ms - _entry_ms(oldest)) / 1000, 3),
                max_size=config.queue.max_size(level),
                max_wait_time_s=level.max_wait_time.seconds,
                paused=is_paused(paused, level.name),
            )
        )
    return out


async def _oldest_unacked(redis: aioredis.Redis, stream: str, group: dict[Any, Any], pending: int) -> str | None:
    if pending:
        summary: Any = await redis.xpending(stream, SCHEDULE_GROUP)
        if summary["min"] is not None:
            return as_str(summary["min"])
        # acked between the two reads (a busy queue): the oldest is the first not delivered, if any
    last = as_str(group["last-delivered-id"])
    after: Any = await redis.xrange(stream, min=f"({last}", count=1)
    return as_str(after[0][0]) if after else None
