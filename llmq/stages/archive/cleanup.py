"""The archive stage's housekeeping, apart from archiving: every few seconds the backlog gauge and trimming
what every group acked from every stream (``trim``), so Redis holds what is in flight and not what was
done; every ``queue.cleanup_interval`` the dead-letter stream's bounds (``queue.dead_letters``); once, the
index of dead letters written before it existed. Each chore apart: one failing never holds up the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import ResponseError

from llmq.pipeline import dlq
from llmq.pipeline.config import Config, DeadLetterConfig
from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.level_status import group_depth
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime.streams import as_str
from llmq.stages.archive.trim import trim_acked

log = logging.getLogger("llmq.archive")

BACKLOG = Gauge("llmq_archive_backlog", "Outcomes in the done stream not yet archived (lag + pending)")
TRIMMED = Counter("llmq_trimmed_total", "Stream entries trimmed after every group acked them", ["stream"])
GROUP = Group.ARCHIVE.value
CLEANUP_EVERY_S = 5.0


class Cleanup:
    def __init__(self, *, config: Config, redis: aioredis.Redis, keys: Keys) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self.dead = dlq.DeadLetters(redis=redis, keys=keys, config=config)

    async def run(self) -> None:
        """Every few seconds: the backlog gauge, and trimming what every group acked (so Redis holds what is in
        flight, not what was done); every ``queue.cleanup_interval``: the dead-letter stream's bounds; once, the
        index of dead letters written before it existed. Each apart: one failing never holds up the others."""
        bounds = self.config.queue.dead_letters
        interval = self.config.queue.cleanup_interval.seconds
        next_bound = time.monotonic()
        indexed = False
        while True:
            if await self._chore("updating the backlog and trimming streams", self._trim_streams):
                if time.monotonic() >= next_bound:
                    next_bound = time.monotonic() + interval
                    await self._chore("bounding the dead letters", lambda: self._bound_dead_letters(bounds))
                if not indexed:
                    indexed = await self._chore("indexing dead letters of an earlier release", self._reindex)
            await asyncio.sleep(CLEANUP_EVERY_S)

    async def _chore(self, what: str, chore: Callable[[], Awaitable[None]]) -> bool:
        """Run one chore of the cleanup loop (a loop boundary): False when it failed."""
        try:
            await chore()
        except UNAVAILABLE as exc:
            log.warning("%s skipped, redis unavailable: %s", what, exc)
            return False
        except Exception:
            log.error("%s failed", what, exc_info=True)
            return False
        return True

    async def _trim_streams(self) -> None:
        await self._update_backlog()
        await self.cleanup()

    async def _bound_dead_letters(self, bounds: DeadLetterConfig) -> None:
        dropped = await self.dead.trim(max_len=bounds.max_len, max_age_s=bounds.retention.seconds)
        if dropped:
            TRIMMED.labels(stream="dlq").inc(dropped)
            log.info("dropped %d dead letters past queue.dead_letters' bounds", dropped)

    async def _reindex(self) -> None:
        if n := await self.dead.reindex():
            log.info("indexed %d dead letters written before the dead-letter index", n)

    async def _update_backlog(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xinfo_groups(self.keys.done)
        pipe.xlen(self.keys.done)
        groups, length = await pipe.execute(raise_on_error=False)
        if isinstance(groups, ResponseError):  # no done stream yet: nothing to archive
            BACKLOG.set(0)
            return
        for g in groups:
            if as_str(g["name"]) == GROUP:
                BACKLOG.set(group_depth(g, length))

    async def cleanup(self) -> dict[str, int]:
        """Trim every stream of the pipeline below what all its groups acked (the DLQ has bounds of its own)."""
        streams = [self.keys.level(lv.name) for lv in self.config.queue.levels]
        streams += [self.keys.dispatch, self.keys.retry, self.keys.done, self.keys.webhooks]
        trimmed = {}
        for stream in streams:
            n = await trim_acked(self.redis, stream)
            if n:
                TRIMMED.labels(stream=stream.rsplit(":", 1)[-1]).inc(n)
                trimmed[stream] = n
        return trimmed
