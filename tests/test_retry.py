"""The retry stage: backoff, Retry-After, cancels during the retry window, dead-lettering after the last
attempt."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from llmq.pipeline.backoff import retry_delay
from llmq.pipeline.config import load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, Status, decode_outcome, encode, new_id
from llmq.pipeline.runtime.effects import Commit, xadd
from llmq.pipeline.runtime.runner import Runner
from llmq.pipeline.submit import new_message
from llmq.stages.dispatch import attempt_line
from llmq.stages.mock_backend import MockSettings
from llmq.stages.retry import Retry, reason_of
from tests.conftest import eventually
from tests.support.harness import CHAT, Harness
from tests.support.runner import settings


async def _calls(h: Harness, n: int) -> bool:
    return h.mocks["a"].calls >= n


async def _xlen(redis: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await redis.xlen(stream)) >= n


async def _calls_at_least(h: Harness, n: int) -> bool:
    return h.mocks["a"].calls >= n


@pytest.mark.parametrize("retry_after", [float("inf"), 1e12])
async def test_a_retry_after_of_for_ever_waits_at_most_max_backoff(
    redis: aioredis.Redis, keys: Keys, retry_after: float
) -> None:
    # Given a backend that answers its first call 503 with Retry-After: inf (or 1e12 seconds)
    backend = MockSettings(fail_rate=1.0, fail_status=503, retry_after_s=retry_after, latency_ms=1)
    env = {"LLMQ_QUEUE__RETRY__MAX_BACKOFF": "300ms"}
    async with Harness(redis, keys, backends={"a": backend}, env=env) as h:
        mid = await h.submit()
        await eventually(lambda: _calls(h, 1), what="the first call")
        h.mocks["a"].settings = MockSettings(latency_ms=1)
        # Then the message is retried within max_backoff on the same backend (its circuit not cooled for ever)
        status = (await h.wait_terminal([mid], within=5))[mid]
    assert status["status"] == "completed" and status["attempts"] == "2"


async def test_a_cancel_during_the_retry_window_is_not_lost(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a message whose call failed and that waits for the retry stage (status "retrying")
    backend = MockSettings(fail_rate=1.0, fail_status=503, latency_ms=1)
    async with Harness(redis, keys, backends={"a": backend}, stages=("schedule", "dispatch")) as h:
        mid = await h.submit()
        await eventually(lambda: _xlen(redis, keys.retry, 1), what="the failed call handed to retry")
        assert (await h.status(mid))["status"] == "retrying"
        # When the client cancels it, and only then the retry stage handles it (and the backend recovers)
        response = await h.http.delete(f"/api/v1/messages/{mid}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        h.mocks["a"].settings = MockSettings(latency_ms=1)
        retry = Retry(config=h.config, redis=redis, keys=keys)
        runner = Runner(retry, redis=redis, keys=keys, consumer="r1", settings=settings())
        await retry.start()
        task = asyncio.create_task(runner.run())
        try:
            await eventually(lambda: _xlen(redis, keys.done, 1), what="an outcome")
            await asyncio.sleep(0.5)  # room for a wrong second run (the retry backoff here is 50-200 ms)
        finally:
            runner.stop()
            await task
            await retry.close()
        calls = h.mocks["a"].calls
    # Then it never runs again: it ends cancelled, once
    assert calls == 1
    assert (await h.status(mid))["status"] == "cancelled"
    outcomes = [decode_outcome(f[FIELD]) for _, f in await redis.xrange(keys.done)]
    assert [(o.message.id, o.status) for o in outcomes] == [(mid, Status.CANCELLED)]


async def test_a_retry_whose_level_was_removed_ends_dead_with_the_reason(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a retry stage whose config no longer has the level "bulk", and two failed messages of it: one
    # arriving now, one already waiting out its backoff
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix})
    retry = Retry(config=config, redis=redis, keys=keys)
    arriving, waiting = (new_message(message_id=new_id(), level="bulk", request=CHAT) for _ in range(2))
    arriving.attempts = waiting.attempts = 1
    commit = Commit(redis, stream=keys.dispatch, group="dispatch", channel=keys.finished, dlq=keys.dlq)
    await commit([("", [xadd(keys.retry, encode(arriving))])])
    await redis.hset(keys.retry_payloads, f"bulk:{waiting.id}", encode(waiting))
    await redis.zadd(keys.retry_due, {f"bulk:{waiting.id}": time.time() - 1})
    # When it runs
    runner = Runner(retry, redis=redis, keys=keys, consumer="r1", settings=settings())
    await retry.start()
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: _xlen(redis, keys.done, 2), what="two outcomes")
    finally:
        runner.stop()
        await task
        await retry.close()
    # Then both end dead with the reason, and are in the dead-letter stream: none is dropped
    for msg in (arriving, waiting):
        status = await redis.hgetall(keys.msg(msg.id))
        assert status[b"status"] == b"dead"
        assert b"level 'bulk' is no longer configured" in status[b"error"]
    assert await redis.xlen(keys.dlq) == 2
    assert await redis.zcard(keys.retry_due) == 0


async def test_the_retry_timer_outlives_a_refused_write(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a retry stage whose first move of due messages is refused (out of memory, say)
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix})
    retry = Retry(config=config, redis=redis, keys=keys)
    move = retry._move
    refused = 0

    async def refusing(keys_: object, args: object) -> object:
        nonlocal refused
        if not refused:
            refused += 1
            raise OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'.")
        return await move(keys_, args)  # type: ignore[arg-type]

    monkeypatch.setattr(retry, "_move", refusing)
    msg = new_message(message_id=new_id(), level="normal", request=CHAT)
    await redis.hset(keys.retry_payloads, f"normal:{msg.id}", encode(msg))
    await redis.zadd(keys.retry_due, {f"normal:{msg.id}": time.time() - 1})
    # When its timer runs, then the message still goes back to its level (the timer died on the error)
    await retry.start()
    try:
        await eventually(lambda: _xlen(redis, keys.level("normal"), 1), within=5, what="the message moved back")
    finally:
        await retry.close()
    assert refused == 1


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


@pytest.mark.parametrize(("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (7, 60.0), (20, 60.0)])
def test_backoff_follows_the_seed_schedule(attempt: int, expected: float) -> None:
    # initial 1s, factor 2, max 60s; rand=0 gives the undiminished delay, rand=1 the most jitter
    kwargs = {"initial_s": 1.0, "factor": 2.0, "max_s": 60.0}
    assert retry_delay(attempt, rand=0.0, **kwargs) == pytest.approx(expected)
    assert retry_delay(attempt, rand=1.0, **kwargs) == pytest.approx(expected * 0.8)


def test_retry_after_is_honoured_when_longer() -> None:
    assert retry_delay(1, initial_s=1, factor=2, max_s=60, retry_after_s=10, rand=0.0) == 10
    assert retry_delay(3, initial_s=1, factor=2, max_s=60, retry_after_s=0.5, rand=0.0) == 4


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("timeout after 30s", "timeout"),
        ("connection error: ConnectError()", "connection"),
        ("backend a answered 503: busy", "http_503"),
        ("every backend for 'm' is down", "no_backend"),
    ],
)
def test_retry_reasons(error: str, reason: str) -> None:
    assert reason_of(error) == reason
    # as the retry stage reads it: the last line of the message's errors (timeouts were labelled "other")
    assert reason_of(attempt_line(2, "a", 0.0, error)) == reason
    assert reason_of(attempt_line(2, "-", 0.0, error)) == reason
    assert reason_of(attempt_line(2, "gpu: east", 0.0, error)) == reason  # (a backend name may hold ": ")
