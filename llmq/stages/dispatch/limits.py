"""Per-backend limits shared by every dispatcher process: concurrent calls, requests and tokens per minute.

A call takes a slot in ``backend:<name>:slots`` (a sorted set scored by lease expiry, so a crashed
dispatcher's slots free themselves) and, when the backend has ``rpm``/``tpm``, adds to the current
minute's counters — all in one script, so no two dispatchers can both take the last slot. The token
estimate is corrected with the response's ``usage`` afterwards, once, with the commit of the outcome.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import Coalesced, Lua
from llmq.pipeline.runtime import effects
from llmq.pipeline.runtime.effects import Effect
from llmq.pipeline.tokens import MAX_ESTIMATE


class BackendLimits:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, lease_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_s = lease_s
        # Every call in flight acquires on its own: those of one turn share a round trip.
        self._acquire = Coalesced(Lua(redis, "acquire_slot"))

    def _window(self, backend: str, kind: str, now: float) -> str:
        return self.keys.backend_window(backend, kind, int(now // 60))

    def keys_of(self, backend: str, now: float) -> list[str]:
        """The keys ``acquire`` takes for ``backend`` at ``now``: its slots, this minute's rpm and tpm."""
        return [self.keys.backend_slots(backend), self._window(backend, "rpm", now), self._window(backend, "tpm", now)]

    async def acquire(
        self,
        backend: str,
        member: str,
        *,
        slots: int,
        rpm: int | None,
        tpm: int | None,
        tokens: int,
        now: float,
    ) -> int:
        """Take a slot of ``backend`` for ``member`` at ``now`` (``scripts/acquire_slot.lua``): 1 when taken now
        (counted in the minute of ``now``), 2 when held already (counted before), 0 at a limit."""
        keys = self.keys_of(backend, now)
        args: list[str | float | int] = [now, now + self.lease_s, member, slots, rpm or 0, tpm or 0, tokens]
        return int(await self._acquire(keys, args))

    def free(self, backend: str, member: str) -> Effect:
        """The effect freeing ``member``'s slot: safe to repeat, so it runs with any commit."""
        return effects.zrem(self.keys.backend_slots(backend), member)

    def correct(
        self, backend: str, *, tpm: int | None, estimated: int, used: int | None, acquired_at: float | None
    ) -> list[Effect]:
        """The effects correcting the token count of the minute the call was counted in (``acquired_at``; None
        when this attempt counted nothing: its slot was held already) by the reported usage: committed with
        the entry's ack, so once."""
        if not tpm or used is None or acquired_at is None:
            return []
        counted = min(estimated, tpm)  # what acquire added
        delta = max(-counted, min(used, MAX_ESTIMATE) - counted)  # bounded: INCRBY must never overflow
        return [effects.incrby(self._window(backend, "tpm", acquired_at), delta, ttl_s=120)] if delta else []

    async def inflight(self, backends: list[str]) -> dict[str, int]:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for name in backends:
            pipe.zcount(self.keys.backend_slots(name), now, "+inf")
        return {name: int(n) for name, n in zip(backends, await pipe.execute(), strict=True)}
