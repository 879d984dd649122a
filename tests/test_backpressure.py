"""Backend backpressure: which answers say "full", the adaptive window (``max_concurrent: auto``) they move,
and a backend refusing past its capacity neither opening its circuit nor losing a message."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from llmq.pipeline.config import load_config
from llmq.pipeline.errors import ConfigError
from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import Lua
from llmq.pipeline.models import Status
from llmq.pipeline.window import BETA, Windows
from llmq.stages.dispatch import Dispatch
from llmq.stages.dispatch.calls import classify
from llmq.stages.dispatch.engines import Engines, Reading, behind, read_metrics
from llmq.stages.dispatch.http_pool import Answer, HTTPError
from llmq.stages.mock_backend import MockBackend, MockSettings
from tests.conftest import eventually
from tests.support.harness import Harness


@pytest.mark.parametrize(
    ("answer", "capacity", "status"),
    [
        (Answer(429, content=b"slow down"), True, Status.RETRYING),
        (Answer(503, content=b'{"error": {"message": "queue full"}}'), True, Status.RETRYING),  # vLLM, Ollama
        (Answer(529, content=b"overloaded"), True, Status.RETRYING),  # Dynamo, Anthropic
        (Answer(503, {"Retry-After": "2"}, b"busy"), True, Status.RETRYING),  # Ray Serve, SGLang's gateway
        (Answer(500, {"x-llm-d-request-dropped-reason": "saturated"}), True, Status.RETRYING),  # llm-d
        (Answer(500, content=b"boom"), False, Status.RETRYING),  # a fault
        (Answer(502, content=b"bad gateway"), False, Status.RETRYING),
        (Answer(408, content=b"timeout"), False, Status.RETRYING),
        (Answer(400, content=b"bad request"), False, Status.FAILED),  # the request's fault
        (Answer(404, {"X-LLM-D-Request-Dropped-Reason": "no such model"}), True, Status.RETRYING),
    ],
)
def test_capacity_signals_are_told_from_faults_and_fatal_answers(
    answer: Answer, capacity: bool, status: Status
) -> None:
    result = classify("b", answer, max_retry_after_s=60)
    assert result.capacity is capacity and result.status is status


class Window:
    """The window script on backend ``b``, with ``busy`` calls in flight."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, low: int = 1, high: int = 32) -> None:
        self.redis, self.keys, self.low, self.high = redis, keys, low, high
        self.script = Lua(redis, "window")

    async def __call__(self, kind: str, *, sent: float, now: float, busy: int = 64, excess: int = 0) -> float:
        slots = self.keys.backend_slots("b")
        await self.redis.delete(slots)
        if busy:
            await self.redis.zadd(slots, {f"call-{i}": now + 60 for i in range(busy)})
        args = [now, kind, self.low, self.high, sent, BETA, excess]
        return float(await self.script([self.keys.backend_limit("b"), slots], args))


async def test_the_window_starts_at_its_maximum_grows_by_one_per_window_and_is_cut_once_per_window(
    redis: aioredis.Redis, keys: Keys
) -> None:
    window = Window(redis, keys)
    # Given a new window (max 32): an answer keeps it at its maximum
    assert await window("ok", sent=1, now=2) == 32
    # When the backend says it is full, the window is cut by BETA
    assert await window("full", sent=3, now=4) == pytest.approx(32 * BETA)
    # and the refusals of calls sent before that cut do not cut it again
    assert await window("full", sent=3.5, now=5) == pytest.approx(32 * BETA)
    # while one sent after it does
    assert await window("full", sent=4.5, now=6) == pytest.approx(32 * BETA * BETA)
    # Then answers grow it by 1/limit each while it is in use: about one slot per window's worth of answers
    limit = 32 * BETA * BETA
    for _ in range(26):
        limit += 1 / limit
    for _ in range(26):
        got = await window("ok", sent=7, now=8, busy=25)
    assert got == pytest.approx(limit, rel=1e-6) and 26.9 < got < 28
    # and not while fewer calls run than it allows (less one): an idle window does not grow
    assert await window("ok", sent=9, now=10, busy=20) == pytest.approx(got)
    assert await window("ok", sent=9, now=10, busy=0) == pytest.approx(got)


async def test_the_window_stays_within_its_bounds(redis: aioredis.Redis, keys: Keys) -> None:
    window = Window(redis, keys, low=2, high=8)
    for i in range(50):  # a backend refusing everything
        got = await window("full", sent=i, now=i + 0.5)
    assert got == 2
    for _ in range(200):
        got = await window("ok", sent=100, now=101)
    assert got == 8


async def test_an_engine_that_says_how_far_over_it_is_cuts_the_window_by_that_much(
    redis: aioredis.Redis, keys: Keys
) -> None:
    window = Window(redis, keys)
    # An engine 20 requests over cuts a window of 32 to 12; one 1 over cuts it by BETA as any signal does
    assert await window("full", sent=1, now=1, excess=20) == 12
    assert await window("full", sent=2, now=2, excess=1) == pytest.approx(12 * BETA)


@pytest.mark.parametrize(
    ("backend", "problem"),
    [
        ("{name: b, url: 'http://x/v1', concurrency: {min: 1, max: 8}}", "needs max_concurrent: auto"),
        ("{name: b, url: 'http://x/v1', max_concurrent: auto, concurrency: {min: 9, max: 8}}", "must not exceed"),
        ("{name: b, url: 'http://x/v1', max_concurrent: lots}", "max_concurrent"),
    ],
)
def test_bad_adaptive_settings_name_the_field(backend: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={"LLMQ_BACKENDS": f"[{backend}]"})
    assert problem in str(raised.value) and "backends[0]" in str(raised.value)


async def test_a_backend_full_past_its_capacity_gets_an_adaptive_window_near_it_and_no_circuit_opens(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a backend that answers 503 to any call past 4 at once (vLLM's --max-num-queued-reqs), behind an
    # adaptive window starting at 16, and a circuit that would open after 3 failures
    backends = {"v": MockSettings(latency_ms=40, busy_above=4, busy_status=503)}
    config = {"v": {"max_concurrent": "auto", "concurrency": {"min": 1, "max": 16}}}
    env = {"LLMQ_LOADBALANCER__MAX_FAILURES": "3", "LLMQ_QUEUE__RETRY__MAX_RETRIES": "20"}
    async with Harness(redis, keys, backends=backends, backend_config=config, env=env) as h:
        # When 120 messages arrive at once
        ids = [await h.submit() for _ in range(120)]
        statuses = await h.wait_terminal(ids, within=60)
        refused = h.mocks["v"].refused
        [dispatch] = [s for s in h.stages if isinstance(s, Dispatch)]
        circuit = dispatch.router.circuits["v"]
        limit = float(await redis.hget(keys.backend_limit("v"), "limit"))  # type: ignore[arg-type]
    # Then every message completed, the circuit never counted a failure, and the window came down to about
    # what the backend takes
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert circuit.failures == 0 and not circuit.open
    assert refused > 0, "the window never reached the backend's capacity"
    assert 3 <= limit < 6, limit
    # and fewer calls were refused than messages sent (with 16 at once, 12 of every 16 calls would be)
    assert refused < len(ids), refused


async def test_a_fixed_max_concurrent_still_rules_and_a_503_spares_the_circuit(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given the same backend behind a fixed max_concurrent of 8
    backends = {"v": MockSettings(latency_ms=20, busy_above=4, busy_status=503)}
    env = {"LLMQ_LOADBALANCER__MAX_FAILURES": "2", "LLMQ_QUEUE__RETRY__MAX_RETRIES": "50"}
    async with Harness(redis, keys, backends=backends, env=env) as h:
        ids = [await h.submit() for _ in range(40)]
        statuses = await h.wait_terminal(ids, within=60)
        peak, refused = h.mocks["v"].peak, h.mocks["v"].refused
        [dispatch] = [s for s in h.stages if isinstance(s, Dispatch)]
        circuit = dispatch.router.circuits["v"]
    # Then calls went 8 at a time (refused past 4), yet the circuit stayed closed and all completed
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert refused > 0 and peak == 4
    assert not circuit.open and circuit.failures == 0
    assert await redis.exists(keys.backend_limit("v")) == 0


VLLM = """# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a",engine="0"} 3.0
vllm:num_requests_waiting{model_name="a",engine="1"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="a",engine="0"} 0.5
vllm:kv_cache_usage_perc{model_name="a",engine="1"} 0.97
"""
SGLANG = 'sglang:num_queue_reqs{model_name="a"} 0\nsglang:token_usage{model_name="a"} 0.2\n'
LLAMA_CPP = "llamacpp:requests_deferred 1\nllamacpp:kv_cache_usage_ratio 0.4\n"


@pytest.mark.parametrize(
    ("text", "waiting", "kv_cache"),
    [(VLLM, 5.0, 0.97), (SGLANG, 0.0, 0.2), (LLAMA_CPP, 1.0, 0.4), ("# nothing of an engine\nup 1\n", None, None)],
)
def test_an_engines_queue_and_kv_cache_are_read_from_its_metrics(
    text: str, waiting: float | None, kv_cache: float | None
) -> None:
    assert read_metrics(text) == Reading(waiting, kv_cache)


def test_a_backend_is_held_while_its_engine_is_past_a_limit() -> None:
    backends = "[{name: v, url: 'http://v/v1', metrics_url: 'http://v/metrics', max_kv_cache_usage: 0.9}]"
    [backend] = load_config(None, env={"LLMQ_BACKENDS": backends}).backends
    assert behind(backend, Reading(0, 0.5)) is None
    assert "1 requests wait in the engine" in (behind(backend, Reading(1, 0.5)) or "")
    assert "KV cache is 95% full" in (behind(backend, Reading(0, 0.95)) or "")
    assert behind(backend, Reading(None, None)) is None  # unreadable metrics hold nothing


async def _engine_queue(h: Harness, ids: list[str]) -> list[int]:
    """The mock engine's queue every 10 ms until every message has ended."""
    seen: list[int] = []
    done = {"completed", "failed", "expired", "cancelled", "dead"}
    while True:
        seen.append(h.mocks["v"].engine_waiting)
        statuses = [(await h.status(i)).get("status") for i in ids]
        if all(s in done for s in statuses):
            assert set(statuses) == {"completed"}, statuses
            return seen
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("window", ["8", "auto"])
async def test_with_engine_metrics_the_waiting_happens_in_llmq_not_in_the_engine(
    redis: aioredis.Redis, keys: Keys, window: str
) -> None:
    # Given an engine that runs 2 calls at once and queues the rest (first come, first served), and llmq
    # allowed 8 calls there (fixed, or a window from 8): without its metrics, then with them (no new call
    # while any request waits there)
    queues: dict[bool, list[int]] = {}
    for metered in (False, True):
        backends = {"v": MockSettings(latency_ms=60, engine_slots=2)}
        config: dict[str, Any] = {"max_concurrent": 8}
        if metered:
            config |= {"metrics_url": "http://127.0.0.1:{port}/metrics", "max_engine_waiting": 0}
            if window == "auto":
                config |= {"max_concurrent": "auto", "concurrency": {"min": 1, "max": 8}}
        async with Harness(redis, keys, backends=backends, backend_config={"v": config}) as h:
            # When 80 messages arrive at once (enough that the window's first cut, a scrape or two after the
            # first calls, does not decide the average)
            ids = [await h.submit() for _ in range(80)]
            queues[metered] = await _engine_queue(h, ids)
    # Then without metrics the engine holds 6 waiting nearly all the time; with them, llmq sends nothing new
    # while any wait there, and the engine's queue is far shorter on average: with a fixed max_concurrent
    # it refills whenever it empties (a hold is released whole); with a window, the window comes down to
    # about what the engine runs
    without, with_ = statistics.mean(queues[False]), statistics.mean(queues[True])
    print(f"engine queue mean, window {window}: without metrics {without:.2f}, with {with_:.2f}")
    assert without > 4.5, without
    assert with_ < (0.8 if window == "8" else 0.4) * without, (with_, without)


async def test_a_held_backends_slots_are_not_admitted_for(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a backend whose engine says 3 requests wait (over max_engine_waiting 0), the mock's own metrics
    backends = {"v": MockSettings(latency_ms=10)}
    config = {"max_concurrent": 4, "metrics_url": "http://127.0.0.1:{port}/metrics"}
    async with Harness(redis, keys, backends=backends, backend_config={"v": config}) as h:
        h.mocks["v"].engine_waiting = 3  # as if other clients filled the engine's queue
        await eventually(lambda: redis.exists(keys.backend_held("v")), what="the backend held")
        # When messages arrive, then none is admitted (the scheduler sees no free slot) nor called
        ids = [await h.submit() for _ in range(5)]
        await asyncio.sleep(0.5)  # (nothing may happen: observed for a while)
        statuses = {(await h.status(i))["status"] for i in ids}
        assert statuses == {"queued"} and h.mocks["v"].calls == 0
        # When the engine's queue empties, they all go through
        h.mocks["v"].engine_waiting = 0
        done = await h.wait_terminal(ids, within=10)
    assert {s["status"] for s in done.values()} == {"completed"}
    reason = await redis.get(keys.backend_held("v"))
    assert reason is None


@pytest.mark.parametrize("form", ["vllm", "header"])
async def test_realtime_overcommits_a_backend_that_schedules_by_priority_and_never_waits_for_a_slot(
    redis: aioredis.Redis, keys: Keys, form: str
) -> None:
    # Given a backend of 2 slots that schedules by priority (the mock engine's priority queue), realtime
    # allowed 1 call over them, and 300 ms calls
    levels = (
        "[{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: 4},"
        " {name: low, priority: 4, max_wait_time: 60s, max_concurrent: 4}]"
    )
    marks = {"priority": "vllm"} if form == "vllm" else {"priority_header": "X-Priority"}
    config = {"max_concurrent": 2, "overcommit": 1, **marks}
    backends = {"v": MockSettings(latency_ms=300, engine_slots=2, engine_policy="priority")}
    env = {"LLMQ_QUEUE__LEVELS": levels}
    async with Harness(redis, keys, backends=backends, backend_config={"v": config}, env=env) as h:
        low = [await h.submit("low") for _ in range(12)]
        await eventually(lambda: _running(h, 2), what="low in both slots")
        # When two realtime messages come while low holds every slot
        rt = [await h.submit("realtime"), await h.submit("realtime")]
        done = await h.wait_terminal(rt, within=10)
        peak, priorities = h.mocks["v"].peak, h.mocks["v"].priorities
        await h.wait_terminal(low, within=20)
    # Then the first is admitted at once (not after a 300 ms call), the second waits: one call over, no more
    waits = sorted(float(s["scheduled_at"]) - float(s["enqueued_at"]) for s in done.values())
    assert waits[0] < 0.1 and waits[1] > 0.1, waits
    assert peak == 3
    # and every call carried its level's priority
    assert priorities["1"] == 2 and priorities["4"] >= 2 and priorities["-"] == 0, priorities


async def _running(h: Harness, n: int) -> bool:
    return h.mocks["v"].current >= n


def test_overcommit_needs_a_backend_that_schedules_by_priority() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={"LLMQ_BACKENDS": "[{name: v, url: 'http://v/v1', overcommit: 1}]"})
    assert "backends[0].overcommit" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={"LLMQ_BACKENDS": "[{name: v, url: 'http://v/v1', priority_header: 'X Prio'}]"})
    assert "backends[0].priority_header" in str(raised.value)


def _backends(spec: str) -> Any:
    return load_config(None, env={"LLMQ_BACKENDS": f"[{spec}]"}).backends


class _Metrics:
    """An engine's /metrics that always says the same."""

    def __init__(self, text: str) -> None:
        self.text = text

    async def get(self, url: str, *, timeout_s: float) -> Answer:
        return Answer(200, {"content-type": "text/plain"}, self.text.encode())


# Found by review: engine readings cut the adaptive window at every scrape, not once per window


async def test_a_steady_engine_backlog_does_not_cut_the_window_at_every_scrape(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given an adaptive backend (window 1..64) whose engine runs 32 calls and has 2 more waiting
    [backend] = _backends(
        "{name: v, url: 'http://v/v1', max_concurrent: auto, metrics_url: 'http://v/metrics', max_engine_waiting: 0}"
    )
    windows = Windows([backend], redis=redis, keys=keys)
    windows.sent("v", time.time())  # calls went out, then the engine reads behind
    text = "vllm:num_requests_waiting 2\nvllm:num_requests_running 32\n"
    engines = Engines([backend], redis=redis, keys=keys, http=_Metrics(text), windows=windows)  # type: ignore[arg-type]
    # When one dispatcher reads that same backlog for 3 seconds (12 scrapes of SCRAPE_S = 0.25 s), during
    # which, the backend being held, no call is sent to it
    for _ in range(12):
        await engines._scrape(backend)
        await windows.settled("v")
    limit = float(await redis.hget(keys.backend_limit("v"), "limit"))  # type: ignore[arg-type]
    # Then the window is cut once (a signal with no call sent since the last cut says nothing new, as the
    # window's own contract says), not at every scrape
    assert limit == pytest.approx(64 * BETA), f"window cut to {limit:.1f} by one steady backlog of 2"


# Found by review: a corrupt (or foreign) window value stopped all admission


async def test_an_unreadable_window_value_does_not_stop_admission(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an adaptive backend whose window hash holds a value that is no number (window-2.lua itself
    # tolerates it: `tonumber(...) or high`)
    backends = {"v": MockSettings(latency_ms=5)}
    config = {"v": {"max_concurrent": "auto", "concurrency": {"min": 1, "max": 4}}}
    async with Harness(redis, keys, backends=backends, backend_config=config) as h:
        await redis.hset(keys.backend_limit("v"), "limit", "garbage")  # type: ignore[misc]
        # When a message arrives, then it is admitted and completed (the window script would repair the value
        # with the first answer), instead of every scheduler round raising ValueError
        ids = [await h.submit()]
        statuses = await h.wait_terminal(ids, within=5)
    assert {s["status"] for s in statuses.values()} == {"completed"}


# Found by review: priority_header could name a header llmq itself sets (the API key's)


@pytest.mark.parametrize("header", ["Authorization", "Content-Length", "Content-Type", "X-LLMQ-Message-Id", "Host"])
def test_priority_header_may_not_replace_a_header_llmq_sends(header: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _backends(f"{{name: b, url: 'http://x/v1', priority: vllm, priority_header: {header}}}")
    assert "priority_header" in str(raised.value)


# Found by review: metrics_url and engine limits accepted silently


@pytest.mark.parametrize("url", ["http://", "https://", "http://exa mple/metrics", "http:///metrics"])
def test_a_metrics_url_without_a_host_is_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        _backends(f"{{name: b, url: 'http://x/v1', metrics_url: '{url}'}}")


@pytest.mark.parametrize("field", ["max_engine_waiting: 4", "max_kv_cache_usage: 0.8"])
def test_engine_limits_without_a_metrics_url_are_refused(field: str) -> None:
    # (as concurrency without max_concurrent: auto, and overcommit without priority, are)
    with pytest.raises(ConfigError):
        _backends(f"{{name: b, url: 'http://x/v1', {field}}}")


# Found by review: a backend down behind a proxy (503, no Retry-After) was never taken out


async def test_a_backend_that_only_answers_503_is_taken_out_of_rotation(redis: aioredis.Redis, keys: Keys) -> None:
    # Given two backends, one of them down behind its load balancer ("503 no healthy upstream", no Retry-After)
    backends = {"a": MockSettings(latency_ms=5), "b": MockSettings(latency_ms=5, fail_rate=1.0, fail_status=503)}
    env = {"LLMQ_LOADBALANCER__MAX_FAILURES": "3", "LLMQ_QUEUE__RETRY__MAX_RETRIES": "5"}
    async with Harness(redis, keys, backends=backends, env=env) as h:
        ids = []
        for _ in range(30):
            ids.append(await h.submit())
            await asyncio.sleep(0.01)
        await h.wait_terminal(ids, within=30)
        calls_to_b = h.mocks["b"].calls
    # Then its circuit opens after max_failures calls, as before issue 19: it is not sent a share of every
    # message's first attempt forever
    assert calls_to_b <= 6, f"the down backend got {calls_to_b} calls for 30 messages"


# Found by review: the mock engine's queue kept a call cancelled while queued in flight


class _Request:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    async def body(self) -> bytes:
        return b'{"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}'


async def test_the_mock_gives_back_a_call_cancelled_while_it_waits_in_the_engine_queue() -> None:
    mock = MockBackend(MockSettings(latency_ms=200, engine_slots=1, busy_above=2), name="m")
    first = asyncio.create_task(mock._answer(_Request(), "chat/completions", "messages"))  # type: ignore[arg-type]
    await asyncio.sleep(0.02)
    queued = asyncio.create_task(mock._answer(_Request(), "chat/completions", "messages"))  # type: ignore[arg-type]
    await asyncio.sleep(0.02)
    queued.cancel()  # its client went away (a server that cancels the handler on disconnect)
    await asyncio.gather(first, queued, return_exceptions=True)
    # Then nothing is counted in flight any more: max_concurrent (busy_above) would refuse calls forever
    assert mock.current == 0 and mock.engine_waiting == 0 and mock.engine_running == 0


class _Unreachable:
    async def get(self, url: str, *, timeout_s: float) -> Answer:
        raise HTTPError("connection refused")


async def test_unreadable_engine_metrics_are_logged_once_not_at_every_scrape(
    redis: aioredis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    [backend] = _backends("{name: v, url: 'http://v/v1', metrics_url: 'http://v/metrics'}")
    windows = Windows([backend], redis=redis, keys=keys)
    engines = Engines([backend], redis=redis, keys=keys, http=_Unreachable(), windows=windows)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="llmq.dispatch"):
        for _ in range(5):
            await engines._scrape(backend)
        engines.http = _Metrics("vllm:num_requests_waiting 0\n")  # type: ignore[assignment]
        await engines._scrape(backend)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("could not read the engine metrics" in line for line in lines) == 1, lines
    assert sum("can be read again" in line for line in lines) == 1, lines
    assert not engines.holding("v")
