"""Consumer names: stable across restarts of one replica, unique across replicas and processes.

A name is held through a lease key (SET NX with a TTL, refreshed by a heartbeat). Without an explicit
name a process takes ``<host>-<n>`` with the lowest free ``n``: a replica that restarts after a clean
stop gets its old name back (and re-reads its own pending entries); two processes on one host never
share a name, so neither re-reads the other's in-hand entries. The reclaimer treats a consumer without a
live lease as dead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llmq.pipeline.errors import ConsumerNameTaken
from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import Lua
from llmq.pipeline.redis import UNAVAILABLE

log = logging.getLogger("llmq.consumer")

MAX_SLOTS = 1024


class ConsumerLease:
    """Holds one consumer name of one group for as long as this process lives."""

    def __init__(self, *, redis: aioredis.Redis, keys: Keys, group: str, ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.group = group
        self.ttl_ms = max(int(ttl_s * 1000), 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.name = ""
        self._refresh = Lua(redis, "lease_refresh")
        self._release = Lua(redis, "lease_release")

    async def acquire(self, name: str | None) -> str:
        """Take ``name`` (ConsumerNameTaken if a live process holds it) or the lowest free ``<host>-<n>``."""
        if name:
            if not await self._take(name):
                raise ConsumerNameTaken(
                    f"consumer name {name!r} of group {self.group!r} is held by a live process; "
                    "pick another --consumer or stop that process"
                )
            return name
        base = socket.gethostname()
        for n in range(1, MAX_SLOTS + 1):
            if await self._take(f"{base}-{n}"):
                return self.name
        raise ConsumerNameTaken(f"all {MAX_SLOTS} consumer names {base}-N of group {self.group!r} are held")

    async def _take(self, name: str) -> bool:
        key = self.keys.consumer_lease(self.group, name)
        # SET NX GET: the holder's token comes back. Ours means an earlier run of this very SET took it (its
        # reply was lost and redis-py sent it again), which a plain SET NX would answer "taken".
        holder: bytes | None = await self.redis.set(key, self.token, nx=True, px=self.ttl_ms, get=True)  # type: ignore[assignment]
        if holder is None or holder.decode() == self.token:
            self.name = name
            return True
        return False

    async def keep(self) -> None:
        """Refresh the lease until cancelled; raise ConsumerNameTaken if another process took it over."""
        key = self.keys.consumer_lease(self.group, self.name)
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                if await self._refresh([key], [self.token, self.ttl_ms]):
                    continue
                if not await self._take(self.name):
                    raise ConsumerNameTaken(f"consumer name {self.name!r} was taken over by another process")
                log.warning("consumer lease had expired and was taken again", extra={"consumer": self.name})
            except UNAVAILABLE as exc:
                log.warning("cannot refresh consumer lease: %s", exc, extra={"consumer": self.name})
            except ResponseError:  # a loop boundary: the name is held as long as the process lives
                log.error("refreshing the consumer lease failed", exc_info=True, extra={"consumer": self.name})

    async def release(self) -> None:
        if self.name:
            await self._release([self.keys.consumer_lease(self.group, self.name)], [self.token])
