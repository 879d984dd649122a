"""Choosing a backend for a message: the ones that serve its model and are usable, in the order of the
balancing algorithm, and, for a session, the backend it is pinned to (affinity).

The balancing and the circuits are pure (no I/O):

- ``round_robin``: rotate through the usable backends.
- ``least_connections``: fewest in-flight calls (shared across dispatchers) first, heavier weight on ties.
- ``weighted``: smooth weighted round robin by ``weight``.

A backend's circuit opens after ``max_failures`` consecutive failures: it gets no traffic until a health
probe succeeds (half-open: the next real call decides). A capacity signal (429, 503, 529) is no failure
while other calls run on the backend (it is full); with none running it is one (a proxy with no healthy
upstream answers 503 too). With Retry-After it cools the backend until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Gauge

from llmq.pipeline import circuits
from llmq.pipeline.config import BackendConfig, Config
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import Message, Status
from llmq.stages.dispatch.calls import CallResult
from llmq.stages.dispatch.limits import BackendLimits

log = logging.getLogger("llmq.dispatch")

BACKEND_UP = Gauge("llmq_backend_up", "1 when the backend's circuit is closed", ["backend"])


_NOT_THE_BACKENDS_FAULT = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
"""Outcomes after which a backend is healthy: an answer, a 4xx (the request's fault), a call stopped by llmq."""


@dataclass(slots=True)
class Circuit:
    max_failures: int
    failures: int = 0
    open: bool = False
    cool_until: float = 0.0

    def usable(self, now: float) -> bool:
        return not self.open and now >= self.cool_until

    def success(self) -> None:
        self.failures = 0
        self.open = False

    def failure(self) -> bool:
        """Count a failure; return True when this one opened the circuit."""
        self.failures += 1
        if not self.open and self.failures >= self.max_failures:
            self.open = True
            return True
        return False

    def cool(self, until: float) -> None:
        self.cool_until = max(self.cool_until, until)

    def view(self, now: float) -> circuits.View:
        if self.open:
            return circuits.View(state="open", failures=self.failures, until=None, at=now)
        if now < self.cool_until:
            return circuits.View(state="cooling", failures=self.failures, until=self.cool_until, at=now)
        return circuits.View(state="closed", failures=self.failures, until=None, at=now)

    def probe(self, healthy: bool) -> bool:
        """Apply a health probe; return True when it closed an open circuit (half-open)."""
        if healthy and self.open:
            self.open = False
            self.failures = self.max_failures - 1  # half-open: one more failure opens it again
            return True
        return False


@dataclass(frozen=True, slots=True)
class BackendView:
    name: str
    weight: int
    inflight: int


class Balancer:
    """Per-process balancing state (round robin position, weighted round robin credits)."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._next = 0
        self._credit: dict[str, int] = {}

    def order(self, backends: Sequence[BackendView]) -> list[str]:
        """All given backends, most preferred first."""
        if not backends:
            return []
        if self.algorithm == "least_connections":
            return [b.name for b in sorted(backends, key=lambda b: (b.inflight / b.weight, -b.weight))]
        if self.algorithm == "weighted":
            total = sum(b.weight for b in backends)
            for b in backends:
                self._credit[b.name] = self._credit.get(b.name, 0) + b.weight
            best = max(backends, key=lambda b: self._credit[b.name])
            self._credit[best.name] -= total
            rest = [b.name for b in sorted(backends, key=lambda b: -self._credit[b.name]) if b.name != best.name]
            return [best.name, *rest]
        start = self._next % len(backends)
        self._next += 1
        rotated = list(backends[start:]) + list(backends[:start])
        return [b.name for b in rotated]


class Router:
    """The backends of this dispatcher, their circuits, and the order a message tries them in."""

    def __init__(self, config: Config, *, redis: aioredis.Redis, keys: Keys, limits: BackendLimits) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self.limits = limits
        self.backends = {b.name: b for b in config.backends}
        lb = config.loadbalancer
        self.circuits = {b.name: Circuit(max_failures=lb.max_failures) for b in config.backends}
        self.balancer = Balancer(lb.algorithm)
        self.changed = asyncio.Event()
        """Set when a circuit opens, closes or cools: this process's view is published again at once."""
        for name in self.backends:
            BACKEND_UP.labels(backend=name).set(1)

    def views(self) -> dict[str, circuits.View]:
        now = time.time()
        return {name: circuit.view(now) for name, circuit in self.circuits.items()}

    def serves(self, model: object) -> bool:
        """Whether any backend serves ``model``, usable or not."""
        return any(not b.models or model in b.models for b in self.backends.values())

    def health(self) -> str:
        if not self.backends:
            return "down"
        now = time.time()
        usable = sum(c.usable(now) for c in self.circuits.values())
        return "ok" if usable == len(self.circuits) else "degraded" if usable else "down"

    def local_preference(self, msg: Message) -> list[str]:
        """Backends in order of preference when this process can tell alone, else none."""
        lb = self.config.loadbalancer
        if self.balancer.algorithm == "least_connections" or (msg.session_id and lb.enable_session_affinity):
            return []
        eligible = self.eligible(msg.request.get("model"))
        return self.ordered(eligible, msg, dict.fromkeys((b.name for b in eligible), 0))

    def eligible(self, model: object) -> list[BackendConfig]:
        now = time.time()
        return [
            b
            for b in self.backends.values()
            if self.circuits[b.name].usable(now) and (not b.models or model in b.models)
        ]

    async def preference(self, eligible: list[BackendConfig], msg: Message) -> list[str]:
        # Only least_connections looks at in-flight counts: spare the others that round trip per call.
        if self.balancer.algorithm == "least_connections":
            inflight = await self.limits.inflight([b.name for b in eligible])
        else:
            inflight = dict.fromkeys((b.name for b in eligible), 0)
        order = self.ordered(eligible, msg, inflight)
        lb = self.config.loadbalancer
        if msg.session_id and lb.enable_session_affinity:
            key = self.keys.affinity(msg.session_id)
            ttl = max(1, int(lb.session_timeout.seconds))
            # Pin atomically (SET NX GET), so concurrent first messages of a session agree on one backend.
            previous: bytes | None = await self.redis.set(key, order[0], nx=True, get=True, ex=ttl)  # type: ignore[assignment]
            name = previous.decode() if previous else order[0]
            if name not in order or (name == msg.failed_backend and len(order) > 1):
                # its backend is down, cannot take this model, or just failed this message: re-pin
                name = order[0]
                await self.redis.set(key, name, ex=ttl)
            elif previous:
                await self.redis.expire(key, ttl)
            # Hard affinity: while its backend is up, a session waits for a slot there (its KV cache).
            order = [name]
        return order

    def ordered(self, eligible: list[BackendConfig], msg: Message, inflight: dict[str, int]) -> list[str]:
        order = self.balancer.order([BackendView(b.name, b.weight, inflight[b.name]) for b in eligible])
        if msg.failed_backend in order and len(order) > 1:
            # Retry elsewhere: a backend that just failed or hung on this message is the last resort.
            order.remove(msg.failed_backend)
            order.append(msg.failed_backend)
        return order

    def record(self, name: str, result: CallResult, *, busy: bool) -> None:
        """Learn from a call's outcome; ``busy``: this process had other calls running on the backend."""
        circuit = self.circuits[name]
        if result.status in _NOT_THE_BACKENDS_FAULT:
            if circuit.failures:
                self.changed.set()
            circuit.success()
        elif result.retry_after is not None:
            circuit.cool(time.time() + result.retry_after)
            self.changed.set()
        elif result.capacity and busy:
            pass  # full, not broken: its window shrinks (max_concurrent: auto), its circuit stays closed
        elif circuit.failure():
            self.changed.set()
            BACKEND_UP.labels(backend=name).set(0)
            log.warning("backend %s taken out after %d consecutive failures", name, circuit.failures)
