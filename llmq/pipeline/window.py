"""Adaptive concurrency (``max_concurrent: auto``): how many calls a backend may run at once, learnt from
how it answers, as TCP learns a congestion window.

A backend that is full says so (429, 503, 529: ``llmq.stages.dispatch.calls.is_capacity``). With a fixed
``max_concurrent`` set too high, every call past its capacity is refused and retried; set too low, its GPUs
idle. With ``auto`` each backend has a window between ``concurrency.min`` and ``concurrency.max``, starting
at the maximum, kept in Redis (``scripts/window-2.lua``) so every dispatcher and scheduler shares it:

- each answer adds ``1 / limit`` (one slot more per window's worth of answers) while the window is in use
  (as many calls in flight as it allows, or one less);
- each capacity signal, or a call that ran out of time, multiplies it by ``BETA``, once per window: only a
  call sent after the last cut cuts again. An engine whose metrics say by how much it is over
  (``llmq.stages.dispatch.engines``) cuts it by that much, when that is more.

With a backend that refuses past N calls the limit then climbs to N + 1, is cut to about 0.9 N by the
first refusal, and climbs back over about N answers: the backend runs 0.9 N to N calls, and a refusal
costs one quick retry per cycle. Dispatchers admit calls under the limit (their view of it is refreshed with
each update they make and every ``REFRESH_S``); the scheduler admits messages under the sum of the limits, so
messages beyond what the backends take wait in their level, where priority applies.

Latency is not a signal here: an LLM call's duration depends on its output's length more than on the
backend's load. An engine's own queue is what says it is behind (its metrics).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from llmq.pipeline.config import BackendConfig
from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import Coalesced, Lua

log = logging.getLogger("llmq.window")

BETA = 0.9
"""The cut on a capacity signal: the backend runs between BETA x N and N calls, (1 + BETA) / 2 on average."""
REFRESH_S = 1.0
"""How often a dispatcher reads the windows the others moved."""

LIMIT = Gauge("llmq_backend_concurrency_limit", "Calls a backend may run at once (adaptive, or fixed)", ["backend"])
CAPACITY_SIGNALS = Counter(
    "llmq_backend_capacity_signals_total",
    "A backend saying it is full: calls refused (429, 503, 529), engine metrics past their limits",
    ["backend"],
)


def slots(backend: BackendConfig, limit: float | None) -> int:
    """The calls ``backend`` may run at once with its window at ``limit`` (None: not read yet, the maximum)."""
    if not backend.adaptive:
        return backend.slots
    bounds = backend.bounds
    return max(bounds.min, min(bounds.max, math.floor(bounds.max if limit is None else limit)))


async def read(redis: aioredis.Redis, keys: Keys, backends: Sequence[BackendConfig]) -> dict[str, int]:
    """Every backend's calls at once as the windows stand now (one round trip when any is adaptive)."""
    adaptive = [b for b in backends if b.adaptive]
    limits: list[bytes | None] = []
    if adaptive:
        pipe = redis.pipeline(transaction=False)
        for b in adaptive:
            pipe.hget(keys.backend_limit(b.name), "limit")
        limits = await pipe.execute()
    read_ = {b.name: limit_of(v) for b, v in zip(adaptive, limits, strict=True)}
    return {b.name: slots(b, read_.get(b.name)) for b in backends}


def limit_of(value: bytes | str | None) -> float | None:
    """A window's limit as Redis holds it; None when absent or no finite number (the script repairs it with
    its next update), so a bad value never stops admission."""
    try:
        limit = float(value) if value is not None else None
    except ValueError:
        return None
    return limit if limit is not None and math.isfinite(limit) else None


class Windows:
    """This dispatcher's view of its backends' windows, and the updates its calls make to them."""

    def __init__(self, backends: Sequence[BackendConfig], *, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.backends = {b.name: b for b in backends}
        self.adaptive = [b for b in backends if b.adaptive]
        self._slots = {b.name: slots(b, None) for b in backends}
        self._script = Coalesced(Lua(redis, "window"))
        self._updates: set[asyncio.Task[None]] = set()
        self._latest: dict[str, asyncio.Task[None]] = {}
        self.last_sent: dict[str, float] = {}
        """When this process last sent each backend a call (what an engine's reading can be about)."""
        for name, n in self._slots.items():
            LIMIT.labels(backend=name).set(n)

    def slots(self, name: str) -> int:
        return self._slots[name]

    def sent(self, name: str, at: float) -> None:
        self.last_sent[name] = at

    def observe(self, name: str, *, full: bool, sent_at: float, excess: float = 0.0) -> None:
        """A call sent at ``sent_at`` was answered (``full``: refused for capacity, or ran out of time; or
        the engine's metrics say it is ``excess`` calls over). The shared window moves in the background: a
        call's outcome never waits for it, nor fails with it."""
        if full:
            CAPACITY_SIGNALS.labels(backend=name).inc()
        backend = self.backends[name]
        if not backend.adaptive:
            return
        task = asyncio.create_task(self._update(backend, full, sent_at, excess))
        self._updates.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._updates.discard)
        self._latest[name] = task

    async def settled(self, name: str) -> None:
        """Until the latest update this process made to ``name``'s window is in (and seen here)."""
        task = self._latest.get(name)
        if task is not None:
            await asyncio.shield(task)

    async def refresh(self) -> None:
        self._set(await read(self.redis, self.keys, self.adaptive))

    async def _update(self, backend: BackendConfig, full: bool, sent_at: float, excess: float) -> None:
        bounds = backend.bounds
        args = [time.time(), "full" if full else "ok", bounds.min, bounds.max, sent_at, BETA, excess]
        try:
            window_keys = [self.keys.backend_limit(backend.name), self.keys.backend_slots(backend.name)]
            limit = float(await self._script(window_keys, args))
        except Exception as exc:  # a boundary: the window stays as this process last saw it
            log.warning("could not update the window of backend %s: %s", backend.name, exc)
            return
        self._set({backend.name: slots(backend, limit)})

    def _set(self, read_: dict[str, int]) -> None:
        for name, n in read_.items():
            if n != self._slots[name]:
                log.debug("backend %s now takes %d calls at once", name, n)
            self._slots[name] = n
            LIMIT.labels(backend=name).set(n)
