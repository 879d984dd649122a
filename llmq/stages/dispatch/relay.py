"""A streamed call's chunks into its message's events stream (``llmq.pipeline.streamed``), as they come.

Chunks that arrive in one turn of the event loop (one read from the backend) go to Redis in one
pipelined round trip, so a chunk waits at most the round trip before it, and Redis sees one call per
read instead of one per token. Each entry has an id of our own (``<ms>-<n>``, n counting the call's
chunks), so a write resent after a lost reply is refused as a duplicate instead of written twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llmq.pipeline.streamed import CHUNK, LIVE_TTL_S, MAX_EVENTS, USAGE

log = logging.getLogger("llmq.dispatch")


class Relay:
    def __init__(self, redis: aioredis.Redis, key: str) -> None:
        self.redis = redis
        self.key = key
        self.base_ms = int(time.time() * 1000)
        self.written = 0
        """Chunks handed to the relay: once one is, the client may have seen it."""
        self._waiting: list[tuple[str, bytes, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, data: bytes, *, usage_only: bool = False) -> None:
        """One chunk as the backend sent it (a ``usage``-only chunk apart: relayed to clients that asked)."""
        self._waiting.append((f"{self.base_ms}-{self.written}", USAGE if usage_only else CHUNK, data))
        self.written += 1
        if self._task is None:
            self._task = asyncio.create_task(self._flush())

    async def close(self) -> None:
        """Wait until every chunk is written (or could not be: then it is logged, and the outcome still
        records the whole answer)."""
        if self._task is not None:
            await self._task

    async def _flush(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(0)  # the chunks of this turn's read come along
                batch, self._waiting = self._waiting, []
                pipe = self.redis.pipeline(transaction=False)
                for entry_id, field, data in batch:
                    pipe.xadd(self.key, {field: data}, id=entry_id, maxlen=MAX_EVENTS, approximate=True)
                pipe.expire(self.key, LIVE_TTL_S)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
                for reply in replies:
                    if isinstance(reply, ResponseError) and "equal or smaller" not in str(reply):
                        raise reply
        except Exception:  # a boundary: the call goes on; clients miss chunks, the outcome has them all
            log.warning("could not relay chunks to %s", self.key, exc_info=True)
            self._waiting = []
        finally:
            self._task = None
