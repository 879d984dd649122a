"""Engine metrics: a backend that publishes its own queue (``metrics_url``) gets no new call while that queue
is longer than ``max_engine_waiting`` or its KV cache fuller than ``max_kv_cache_usage``.

An inference engine takes every request it is sent and queues what it cannot run yet, first come first
served: a realtime request sent while the engine's queue holds low ones waits behind them, where llmq's
priorities no longer apply. Holding new calls while the engine says it is behind keeps that waiting in
llmq's levels instead. Each dispatcher reads the metrics every ``SCRAPE_S``; a backend held is marked in
Redis (``backend:<name>:held``, expiring after ``HELD_TTL_S``) so the scheduler admits nothing more for it,
and no dispatcher takes one of its slots until it is released. A hold is released whole: with a fixed
``max_concurrent`` the engine's queue refills at once. With ``max_concurrent: auto`` each reading past the
limits is also a capacity signal to the backend's window (``llmq.pipeline.window``), which then settles near
what the engine runs, so a release sends about what the engine can take. Metrics that cannot be read hold nothing: the
backend's circuit and window deal with a backend that does not answer.

What is read (summed over the engine's label sets; the KV cache's fullest):

| engine | waiting | KV cache usage (0-1) |
|---|---|---|
| vLLM | ``vllm:num_requests_waiting`` | ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before 0.10) |
| SGLang | ``sglang:num_queue_reqs`` | ``sglang:token_usage`` |
| llama.cpp server (``--metrics``) | ``llamacpp:requests_deferred`` | ``llamacpp:kv_cache_usage_ratio`` |
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from llmq.pipeline.config import BackendConfig
from llmq.pipeline.keys import Keys
from llmq.pipeline.window import Windows
from llmq.stages.dispatch.http_pool import HTTPError, Pool

log = logging.getLogger("llmq.dispatch")

SCRAPE_S = 0.25
HELD_TTL_S = 3 * SCRAPE_S
"""A hold lapses by itself when no dispatcher renews it (they all stopped, or the engine recovered)."""
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred")
KV_CACHE = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",
)

ENGINE_WAITING = Gauge(
    "llmq_engine_waiting", "Requests waiting inside a backend's engine, from its metrics", ["backend"]
)
ENGINE_KV_CACHE = Gauge("llmq_engine_kv_cache_usage", "A backend engine's KV cache usage (0-1)", ["backend"])
HELD = Gauge("llmq_backend_held", "1 while a backend gets no new call: its engine is behind", ["backend"])
SCRAPE_ERRORS = Counter("llmq_engine_scrape_errors_total", "Engine metrics that could not be read", ["backend"])


@dataclass(frozen=True, slots=True)
class Reading:
    waiting: float | None
    kv_cache: float | None


def read_metrics(text: str) -> Reading:
    """The waiting requests and KV cache usage in an engine's Prometheus text (None: not published)."""
    waiting: float | None = None
    kv_cache: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WAITING:
                waiting = (waiting or 0.0) + sample.value
            elif sample.name in KV_CACHE:
                kv_cache = max(kv_cache or 0.0, sample.value)
    return Reading(waiting, kv_cache)


def behind(backend: BackendConfig, reading: Reading) -> str | None:
    """Why ``backend`` should get no new call, from its engine's ``reading``; None when it may."""
    waiting, kv_cache = backend.engine_waiting_limit, backend.kv_cache_limit
    if reading.waiting is not None and reading.waiting > waiting:
        return f"{reading.waiting:g} requests wait in the engine (max_engine_waiting {waiting})"
    if reading.kv_cache is not None and reading.kv_cache > kv_cache:
        return f"its KV cache is {reading.kv_cache:.0%} full (max_kv_cache_usage {kv_cache:g})"
    return None


class Engines:
    """The holds of this dispatcher's backends that publish engine metrics."""

    def __init__(
        self, backends: Sequence[BackendConfig], *, redis: aioredis.Redis, keys: Keys, http: Pool, windows: Windows
    ) -> None:
        self.metered = [b for b in backends if b.metrics_url]
        self.windows = windows
        self.redis = redis
        self.keys = keys
        self.http = http
        self._held: dict[str, str] = {}
        """Backend -> why it is held, as this process last read its engine."""
        self._failing: set[str] = set()
        """Backends whose metrics could not be read last time."""

    def holding(self, name: str) -> bool:
        return name in self._held

    async def run(self) -> None:
        while True:
            await asyncio.gather(*(self._scrape(b) for b in self.metered))
            await asyncio.sleep(SCRAPE_S)

    async def _scrape(self, backend: BackendConfig) -> None:
        assert backend.metrics_url is not None
        try:
            answer = await self.http.get(backend.metrics_url, timeout_s=min(2.0, SCRAPE_S * 4))
            if not answer.is_success:
                raise HTTPError(f"answered {answer.status}")
            reading = read_metrics(answer.text)
        except Exception as exc:  # unreachable, or what it answered is no Prometheus text: hold nothing
            SCRAPE_ERRORS.labels(backend=backend.name).inc()
            if backend.name not in self._failing:  # once, not every SCRAPE_S (the counter counts them all)
                log.warning("could not read the engine metrics of backend %s: %s", backend.name, exc)
            self._failing.add(backend.name)
            reading = Reading(None, None)
        else:
            if backend.name in self._failing:
                log.info("the engine metrics of backend %s can be read again", backend.name)
            self._failing.discard(backend.name)
        if reading.waiting is not None:
            ENGINE_WAITING.labels(backend=backend.name).set(reading.waiting)
        if reading.kv_cache is not None:
            ENGINE_KV_CACHE.labels(backend=backend.name).set(reading.kv_cache)
        why = behind(backend, reading)
        sent = self.windows.last_sent.get(backend.name)
        if why is not None and backend.adaptive and sent is not None:
            # A capacity signal about the calls sent so far: the window shrinks to what the engine runs, once
            # for them (a reading with no call sent since the last cut says nothing new).
            excess = max(0.0, (reading.waiting or 0.0) - backend.engine_waiting_limit)
            self.windows.observe(backend.name, full=True, sent_at=sent, excess=excess)
        key = self.keys.backend_held(backend.name)
        try:
            if why is not None:
                await self.redis.set(key, why, px=int(HELD_TTL_S * 1000))
            elif backend.name in self._held:
                await self.redis.delete(key)
        except Exception as exc:  # a boundary: this process still holds or releases it for itself
            log.warning("could not share the hold of backend %s: %s", backend.name, exc)
        if why is not None and backend.name not in self._held:
            log.info("backend %s held: %s", backend.name, why)
        elif why is None and backend.name in self._held:
            log.info("backend %s released: its engine caught up", backend.name)
        if why is None:
            self._held.pop(backend.name, None)
        else:
            self._held[backend.name] = why
        HELD.labels(backend=backend.name).set(1 if why else 0)
