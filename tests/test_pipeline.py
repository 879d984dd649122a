"""schedule + dispatch + retry end to end on real Redis, with mock backends over real HTTP."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.config import load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, decode_outcome, encode, new_id
from llmq.pipeline.runtime.streams import ensure_group, parse_entries
from llmq.stages.dispatch import calls
from llmq.stages.ingest.submit import new_message
from llmq.stages.mock_backend import MockSettings
from llmq.stages.schedule.arbiter import Arbiter, Candidate, Decisions
from llmq.stages.schedule.stagger import MIN_CALLS
from tests.conftest import eventually
from tests.harness import CHAT, Harness


async def test_messages_complete_with_the_backend_response(redis: aioredis.Redis, keys: Keys) -> None:
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=5)}) as h:
        ids = [await h.submit("normal") for _ in range(20)]
        statuses = await h.wait_terminal(ids)
    assert {s["status"] for s in statuses.values()} == {"completed"}
    result = msgspec.json.decode(statuses[ids[0]]["result"])
    assert result["choices"][0]["message"]["content"] == "mock reply from a"
    assert result["usage"]["total_tokens"] > 0
    done = [decode_outcome(f[FIELD]) for _, f in await redis.xrange(keys.done)]
    assert sorted(o.message.id for o in done) == sorted(ids)
    assert all(o.backend == "a" and o.response is not None and o.prompt_tokens for o in done)
    assert await redis.zcard(keys.inflight("normal")) == 0  # slots released


async def test_an_echo_backend_answers_inside_the_dispatcher(redis: aioredis.Redis, keys: Keys) -> None:
    env = {"LLMQ_BACKENDS": '[{name: echo, url: "echo://local/v1"}]'}
    async with Harness(redis, keys, backends={}, env=env) as h:
        ids = [await h.submit("normal") for _ in range(10)]
        statuses = await h.wait_terminal(ids)
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert {s["backend"] for s in statuses.values()} == {"echo"}
    result = msgspec.json.decode(statuses[ids[0]]["result"])
    assert result["choices"][0]["message"]["content"] == "mock reply from echo"


async def test_realtime_is_admitted_within_its_slo_behind_a_flood_of_low(redis: aioredis.Redis, keys: Keys) -> None:
    # Given backends kept busy by 1000 queued low messages (4 slots, 300 ms calls)
    env = {
        "LLMQ_QUEUE__LEVELS": "[{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: 4, reserved: 1},"
        " {name: low, priority: 4, max_wait_time: 2s, max_concurrent: 4}]",
    }
    backends = {"a": MockSettings(latency_ms=300)}
    async with Harness(redis, keys, backends=backends, env=env, backend_config={"a": {"max_concurrent": 4}}) as h:
        low_ids = [await h.submit("low") for _ in range(1000)]
        await eventually(lambda: _inflight_is(redis, keys, "low", 3), what="low fills the unreserved slots")
        # When realtime messages arrive one by one
        rt_ids = []
        for _ in range(10):
            rt_ids.append(await h.submit("realtime"))
            await asyncio.sleep(0.35)
        statuses = await h.wait_terminal(rt_ids)
        low_done = sum([(await h.status(i)).get("status") == "completed" for i in low_ids[:50]])
        peak = h.mocks["a"].peak
    # Then each realtime message was admitted within its 100 ms max_wait_time
    waits = [float(s["scheduled_at"]) - float(s["enqueued_at"]) for s in statuses.values()]
    assert max(waits) <= 0.1, waits
    assert {s["status"] for s in statuses.values()} == {"completed"}
    # and low kept flowing, without the backend ever running more than its 4 slots
    assert low_done > 0
    assert peak <= 4


@pytest.mark.parametrize("stagger", [True, False])
async def test_a_backlog_on_regular_calls_is_staggered_so_slots_free_one_by_one(
    redis: aioredis.Redis, keys: Keys, stagger: bool
) -> None:
    # Given 5 unreserved slots (6, one reserved for realtime) and calls of a fixed 100 ms
    env = {
        "LLMQ_SCHEDULER__STAGGER": str(stagger).lower(),
        "LLMQ_QUEUE__LEVELS": "[{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: 6, reserved: 1},"
        " {name: low, priority: 4, max_wait_time: 60s, max_concurrent: 6}]",
    }
    backends = {"a": MockSettings(latency_ms=100)}
    async with Harness(redis, keys, backends=backends, env=env, backend_config={"a": {"max_concurrent": 6}}) as h:
        # When a backlog of 50 low messages arrives at once
        ids = [await h.submit("low") for _ in range(50)]
        statuses = await h.wait_terminal(ids)
    admitted = sorted(float(s["scheduled_at"]) for s in statuses.values())
    finished = sorted(float(s["finished_at"]) for s in statuses.values())
    # The first 5 start together (no call has ended yet to say how long one takes), and so may the refills
    # of the next call or two, while the first calls (new connections, slower) weigh in the estimate; the
    # last 5 find no backlog behind them, and nothing holds them back
    later = [b - a for a, b in itertools.pairwise(admitted[20:-5])]
    ends = [b - a for a, b in itertools.pairwise(finished[10:-5])]
    if stagger:
        # Then, once calls have ended, admissions keep 0.9 × 100 ms / 5 slots = 18 ms apart, so slots free
        # one by one instead of five at once every 100 ms (but for a pair or two on a loaded machine, where
        # the calls seem to vary by more than the spacing for a moment and it is off)
        assert sum(gap < 0.015 for gap in later) <= 2, str([round(x, 4) for x in later])
        assert max(ends) < 0.08, ends  # (five at once leave a pause of about 95 ms)
    else:
        # (without staggering the first wave repeats: slots freed together are refilled together, in one
        # admission round or a few ms apart)
        assert any(gap < 0.002 for gap in later), later


async def _inflight_is(redis: aioredis.Redis, keys: Keys, level: str, n: int) -> bool:
    return int(await redis.zcount(keys.inflight(level), time.time(), "+inf")) >= n


async def test_aging_lets_low_through_under_a_stream_of_high(redis: aioredis.Redis, keys: Keys) -> None:
    env = {
        "LLMQ_QUEUE__LEVELS": "[{name: high, priority: 2, max_wait_time: 5s, max_concurrent: 2},"
        " {name: low, priority: 4, max_wait_time: 300ms, max_concurrent: 2}]",
    }
    backends = {"a": MockSettings(latency_ms=50)}
    async with Harness(redis, keys, backends=backends, env=env, backend_config={"a": {"max_concurrent": 2}}) as h:
        low = await h.submit("low")
        highs = [await h.submit("high") for _ in range(60)]  # 60 × 50 ms on 2 slots: 1.5 s of high work
        status = (await h.wait_terminal([low], within=10))[low]
        high_statuses = await h.wait_terminal(highs, within=20)
    last_high_start = max(float(s["scheduled_at"]) for s in high_statuses.values())
    # low started after waiting about its max_wait_time, long before the high backlog was through
    assert float(status["scheduled_at"]) < last_high_start - 0.5
    assert float(status["scheduled_at"]) - float(status["enqueued_at"]) < 1.0


async def test_level_and_backend_concurrency_limits_hold(redis: aioredis.Redis, keys: Keys) -> None:
    env = {"LLMQ_QUEUE__LEVELS": "[{name: normal, priority: 3, max_wait_time: 30s, max_concurrent: 5}]"}
    backends = {"a": MockSettings(latency_ms=100), "b": MockSettings(latency_ms=100)}
    config = {"a": {"max_concurrent": 2}, "b": {"max_concurrent": 10}}
    async with Harness(redis, keys, backends=backends, env=env, backend_config=config) as h:
        ids = [await h.submit("normal") for _ in range(60)]
        await h.wait_terminal(ids)
        peaks = {name: m.peak for name, m in h.mocks.items()}
    assert peaks["a"] <= 2
    assert peaks["a"] + peaks["b"] <= 5 + 1  # level max 5 (peaks are per backend, sampled apart)
    assert peaks["b"] <= 5


async def _clear_of_a_minute_boundary(margin_s: float) -> None:
    """rpm/tpm count per clock minute: a test that must stay inside one minute starts early enough in it."""
    into = time.time() % 60
    if into > 60 - margin_s:
        await asyncio.sleep(60 - into + 0.1)


async def test_tpm_estimates_hold_calls_back_and_usage_corrects_them(redis: aioredis.Redis, keys: Keys) -> None:
    # Each call is estimated at 257 tokens ("hello" is 1 prompt token, no max_tokens: a budget of 256),
    # so 600 tokens a minute admit two at once. The mock reports 17 used, and the correction makes room
    # for the rest within the same minute: without it the third call would wait for the next minute.
    backends = {"a": MockSettings(latency_ms=100)}
    await _clear_of_a_minute_boundary(margin_s=10)
    async with Harness(redis, keys, backends=backends, backend_config={"a": {"max_concurrent": 8, "tpm": 600}}) as h:
        ids = [await h.submit() for _ in range(6)]
        statuses = await h.wait_terminal(ids, within=8)
        peak = h.mocks["a"].peak
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert peak == 2


async def test_rpm_holds_calls_until_the_next_minute_and_shutdown_gives_them_back(
    redis: aioredis.Redis, keys: Keys
) -> None:
    backends = {"a": MockSettings(latency_ms=1)}
    await _clear_of_a_minute_boundary(margin_s=10)
    async with Harness(redis, keys, backends=backends, backend_config={"a": {"max_concurrent": 8, "rpm": 3}}) as h:
        ids = [await h.submit() for _ in range(5)]

        async def three_completed() -> bool:
            return [(await h.status(i)).get("status") for i in ids].count("completed") == 3

        await eventually(three_completed, what="the minute's 3 calls")
        await asyncio.sleep(0.5)  # the other two keep waiting for a slot in the next minute
        calls = h.mocks["a"].calls
        stopping = time.monotonic()
    stopped_in = time.monotonic() - stopping
    waiting = [i for i in ids if (await h.status(i)).get("status") != "completed"]
    pending = await redis.xpending(keys.dispatch, "dispatch")
    assert calls == 3 and len(waiting) == 2
    # A call that never started does not hold shutdown for the grace period (30 s): it is given back,
    # pending in the dispatch group for the next dispatcher.
    assert stopped_in < 5 and pending["pending"] == 2


async def pending(redis: aioredis.Redis, keys: Keys, consumer: str, n: int, decisions: Decisions) -> list[Candidate]:
    """``n`` normal messages as a scheduler holds them: entries of the level stream pending for ``consumer``."""
    stream = keys.level("normal")
    await ensure_group(redis, stream, "schedule")
    messages = [new_message(message_id=new_id(), level="normal", request=CHAT) for _ in range(n)]
    for m in messages:
        await redis.xadd(stream, {FIELD: encode(m)})
        await redis.hset(keys.msg(m.id), "status", "queued")
    reply = await redis.xreadgroup("schedule", consumer, {stream: ">"}, count=n)
    return [Candidate(e, m, decisions) for e, m in zip(parse_entries(reply[0][1]), messages, strict=True)]


async def test_a_shutdown_during_an_admission_round_does_not_break_the_arbiter(
    redis: aioredis.Redis, keys: Keys
) -> None:
    env = {"LLMQ_KEY_PREFIX": keys.prefix, "LLMQ_BACKENDS": '[{name: a, url: "echo://a/v1", max_concurrent: 4}]'}
    arbiter = Arbiter(load_config(None, env=env), redis=redis, keys=keys)
    arbiter.offer("normal", await pending(redis, keys, "c1", 3, asyncio.Queue()))
    admit = arbiter._admit_run

    async def admit_then_shut_down(*args: Any) -> list[int | bytes]:
        admitted = await admit(*args)
        arbiter.give_back()  # SIGTERM arrives while the admission script runs
        return admitted

    arbiter._admit_run = admit_then_shut_down  # type: ignore[method-assign]
    await arbiter._round()  # raised IndexError (the emptied queue), which killed the arbiter task
    assert await redis.xlen(keys.dispatch) == 3
    assert not any(arbiter.waiting.values())


async def test_two_schedulers_keep_one_stagger_between_them(redis: aioredis.Redis, keys: Keys) -> None:
    # Given two scheduler processes' arbiters, each with a backlog of normal messages for 4 slots, that have
    # seen calls of a regular second end (a staggering interval of 0.9 × 1 s / 4 slots)
    env = {"LLMQ_KEY_PREFIX": keys.prefix, "LLMQ_BACKENDS": '[{name: a, url: "echo://a/v1", max_concurrent: 4}]'}
    arbiters = [Arbiter(load_config(None, env=env), redis=redis, keys=keys) for _ in range(2)]
    for n, arbiter in enumerate(arbiters):
        for _ in range(MIN_CALLS):
            arbiter.stagger.observe(1.0)
        arbiter.offer("normal", await pending(redis, keys, f"c{n}", 6, asyncio.Queue()))
    # When both run an admission round at once, and the first runs another
    for arbiter in [*arbiters, arbiters[0]]:
        await arbiter._round()
    # Then one message was admitted in all: the next waits for the interval, whichever process admits it
    assert await redis.xlen(keys.dispatch) == 1
    assert sorted(len(a.waiting["normal"]) for a in arbiters) == [5, 6]
    next_at = float(await redis.get(keys.stagger))
    assert next_at - time.time() == pytest.approx(0.225, abs=0.1)


async def test_a_call_that_fails_unexpectedly_frees_its_backend_slot_at_once(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a bug: reading a backend's answer raises
    def broken(*_: object) -> None:
        raise RuntimeError("a bug reading the answer")

    monkeypatch.setattr(calls, "classify", broken)
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=5)}) as h:
        # When a message's call ends in it
        await h.submit("normal")
        await eventually(lambda: _called(h), what="the backend was called")
        # Then the batch fails and the message stays pending, but the backend slot does not wait for its
        # lease (scheduler.timeout + 5 s) to expire
        await eventually(lambda: _no_slot_taken(redis, keys, "a"), within=2, what="the slot freed")


async def _called(h: Harness) -> bool:
    return h.mocks["a"].calls > 0


async def _no_slot_taken(redis: aioredis.Redis, keys: Keys, backend: str) -> bool:
    return int(await redis.zcard(keys.backend_slots(backend))) == 0


async def test_round_robin_spreads_evenly(redis: aioredis.Redis, keys: Keys) -> None:
    backends = {n: MockSettings(latency_ms=1) for n in ("a", "b", "c")}
    env = {"LLMQ_QUEUE__WORKER__MAX_CONCURRENT": "1"}
    async with Harness(redis, keys, backends=backends, env=env) as h:
        ids = [await h.submit() for _ in range(30)]
        await h.wait_terminal(ids)
        calls = {n: m.calls for n, m in h.mocks.items()}
    assert calls == {"a": 10, "b": 10, "c": 10}


async def test_least_connections_prefers_idle_backends(redis: aioredis.Redis, keys: Keys) -> None:
    backends = {"slow": MockSettings(latency_ms=500), "fast": MockSettings(latency_ms=5)}
    env = {"LLMQ_LOADBALANCER__ALGORITHM": "least_connections"}
    async with Harness(redis, keys, backends=backends, env=env) as h:
        ids = [await h.submit() for _ in range(40)]
        await h.wait_terminal(ids)
        calls = {n: m.calls for n, m in h.mocks.items()}
    assert calls["fast"] > 3 * calls["slow"], calls


async def test_session_affinity_pins_a_session_to_one_backend(redis: aioredis.Redis, keys: Keys) -> None:
    backends = {n: MockSettings(latency_ms=1) for n in ("a", "b", "c")}
    async with Harness(redis, keys, backends=backends) as h:
        ids = [await h.submit(session_id="chat-42") for _ in range(12)]
        statuses = await h.wait_terminal(ids)
        others = [await h.submit(session_id=f"s{i}") for i in range(12)]
        other_statuses = await h.wait_terminal(others)
    assert {s["backend"] for s in statuses.values()} == {statuses[ids[0]]["backend"]}
    assert len({s["backend"] for s in other_statuses.values()}) > 1


async def test_a_failing_backend_is_taken_out_and_comes_back(redis: aioredis.Redis, keys: Keys) -> None:
    # Given three backends of which one fails every call
    backends = {
        "good1": MockSettings(latency_ms=5),
        "good2": MockSettings(latency_ms=5),
        "bad": MockSettings(fail_rate=1.0, latency_ms=5),
    }
    env = {
        "LLMQ_LOADBALANCER__MAX_FAILURES": "2",
        "LLMQ_LOADBALANCER__HEALTH_CHECK_INTERVAL": "3s",
        "LLMQ_QUEUE__RETRY__MAX_RETRIES": "5",
    }
    async with Harness(redis, keys, backends=backends, env=env) as h:
        ids = [await h.submit() for _ in range(60)]
        statuses = await h.wait_terminal(ids)
        # Then it is taken out: no message failed, and new traffic avoids it
        assert 'llmq_backend_up{backend="bad"} 0.0' in await _metrics(h)
        bad_calls = h.mocks["bad"].calls
        more = [await h.submit() for _ in range(30)]
        await h.wait_terminal(more)
        assert h.mocks["bad"].calls <= bad_calls + 1  # at most one half-open trial after a probe
        # When it recovers, the health probe brings it back and it gets traffic again
        h.mocks["bad"].settings = MockSettings(latency_ms=5)
        await eventually(lambda: _backend_up(h, "bad"), within=8, what="bad probed back in")
        before = h.mocks["bad"].calls
        again = [await h.submit() for _ in range(30)]
        await h.wait_terminal(again)
        calls_after = h.mocks["bad"].calls
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert calls_after >= before + 5


async def test_a_hanging_backend_times_out_and_the_retry_goes_elsewhere(redis: aioredis.Redis, keys: Keys) -> None:
    # Given three backends of which one never answers, and a circuit that will not open on its own
    backends = {
        "a": MockSettings(latency_ms=5),
        "b": MockSettings(latency_ms=5),
        "hang": MockSettings(latency_ms=60_000),
    }
    env = {"LLMQ_SCHEDULER__TIMEOUT": "500ms", "LLMQ_LOADBALANCER__MAX_FAILURES": "1000"}
    async with Harness(redis, keys, backends=backends, env=env) as h:
        # When messages arrive, half of them in sessions (pinned to one backend)
        ids = [await h.submit() for _ in range(15)]
        ids += [await h.submit(session_id=f"s{i}") for i in range(15)]
        statuses = await h.wait_terminal(ids)
        hung = h.mocks["hang"].by_message
    # Then every call to the hanging backend timed out, and each such message completed on another one
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert len(hung) >= 5, hung
    assert max(hung.values()) == 1, hung
    for message_id in hung:
        assert statuses[message_id]["attempts"] == "2"
        assert statuses[message_id]["backend"] in {"a", "b"}


async def _metrics(_: Harness) -> str:
    from prometheus_client import generate_latest

    return generate_latest().decode()


async def _backend_up(h: Harness, name: str) -> bool:
    return f'llmq_backend_up{{backend="{name}"}} 1.0' in await _metrics(h)


async def test_expired_and_cancelled_messages_are_never_sent(redis: aioredis.Redis, keys: Keys) -> None:
    env = {"LLMQ_QUEUE__LEVELS": "[{name: normal, priority: 3, max_wait_time: 30s, max_concurrent: 1}]"}
    backends = {"a": MockSettings(latency_ms=400)}

    async def done() -> dict[str, str]:
        return {
            decode_outcome(f[FIELD]).message.id: decode_outcome(f[FIELD]).status
            for _, f in await redis.xrange(keys.done)
        }

    async with Harness(redis, keys, backends=backends, env=env, backend_config={"a": {"max_concurrent": 1}}) as h:
        blocker = await h.submit()
        expiring = await h.submit(deadline_ms=100)
        cancelled = await h.submit()
        await redis.hset(keys.msg(cancelled), "status", "cancelled")  # what DELETE /messages/{id} does
        statuses = await h.wait_terminal([blocker, expiring, cancelled])
        # A cancelled status is terminal at once; its outcome is recorded a moment later.
        await eventually(lambda: _has(done, 3), what="3 outcomes")
        sent = dict(h.mocks["a"].by_message)
    assert statuses[expiring]["status"] == "expired"
    assert statuses[cancelled]["status"] == "cancelled"
    assert statuses[blocker]["status"] == "completed"
    assert set(sent) == {blocker}
    assert await done() == {blocker: "completed", expiring: "expired", cancelled: "cancelled"}


async def _has(outcomes: Callable[[], Awaitable[dict[str, str]]], n: int) -> bool:
    return len(await outcomes()) >= n


async def test_client_errors_fail_without_retry(redis: aioredis.Redis, keys: Keys) -> None:
    backends = {"a": MockSettings(fail_rate=1.0, fail_status=400)}
    async with Harness(redis, keys, backends=backends) as h:
        [mid] = [await h.submit()]
        status = (await h.wait_terminal([mid]))[mid]
        calls = h.mocks["a"].calls
    assert status["status"] == "failed" and "answered 400" in status["error"]
    assert calls == 1


async def test_an_unknown_model_fails_at_once(redis: aioredis.Redis, keys: Keys) -> None:
    async with Harness(redis, keys, backends={"a": MockSettings()}, backend_config={"a": {"models": ["llama"]}}) as h:
        mid = await h.submit()  # asks for model "m"
        status = (await h.wait_terminal([mid]))[mid]
    assert status["status"] == "failed" and "no backend serves model 'm'" in status["error"]


async def test_failures_are_retried_on_the_backoff_then_dead_lettered(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a backend that always answers 503, 2 retries with 100 ms initial backoff, factor 3
    env = {
        "LLMQ_QUEUE__RETRY__MAX_RETRIES": "2",
        "LLMQ_QUEUE__RETRY__INITIAL_BACKOFF": "100ms",
        "LLMQ_QUEUE__RETRY__FACTOR": "3",
        "LLMQ_QUEUE__RETRY__MAX_BACKOFF": "5s",
        "LLMQ_LOADBALANCER__MAX_FAILURES": "100",
    }
    async with Harness(
        redis, keys, backends={"a": MockSettings(fail_rate=1.0, fail_status=503, latency_ms=1)}, env=env
    ) as h:
        started = time.time()
        mid = await h.submit()
        status = (await h.wait_terminal([mid], within=15))[mid]
        elapsed = time.time() - started
        calls = h.mocks["a"].calls
    # Then it was tried 1 + 2 times, waiting about 0.1 s then 0.3 s (less up to 20 % jitter)
    assert calls == 3
    assert 0.32 <= elapsed < 2.0, elapsed
    assert status["status"] == "dead" and status["attempts"] == "3"
    [(_, dead)] = await redis.xrange(keys.dlq)
    errors = msgspec.json.decode(dead[b"errors"])
    assert len(errors) == 3 and all("answered 503" in e for e in errors)
    assert dead[b"message_id"].decode() == mid
    assert dead[b"reason"] == b"failed 3 attempts (max_retries 2)"


async def test_429_retry_after_is_honoured(redis: aioredis.Redis, keys: Keys) -> None:
    backend = MockSettings(fail_rate=1.0, fail_status=429, retry_after_s=0.6, latency_ms=1)
    # (Retry-After is honoured up to queue.retry.max_backoff)
    async with Harness(redis, keys, backends={"a": backend}, env={"LLMQ_QUEUE__RETRY__MAX_BACKOFF": "2s"}) as h:
        mid = await h.submit()
        await eventually(lambda: _calls_at_least(h, 1), what="first call")
        first = time.time()
        h.mocks["a"].settings = MockSettings(latency_ms=1)
        status = (await h.wait_terminal([mid]))[mid]
    assert status["status"] == "completed"
    assert float(status["finished_at"]) - first >= 0.55  # not the 50 ms initial backoff


async def _calls_at_least(h: Harness, n: int) -> bool:
    return h.mocks["a"].calls >= n
