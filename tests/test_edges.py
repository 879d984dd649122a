"""The edges a hostile review found (issue 16): backend answers that cannot be stored, Retry-After values that
would park a message for ever, calls that trickle past the timeout, leases that lapse while dispatch waits,
a cancel during the retry window, a retry whose level is gone, idempotency keys shared across callers."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from pipeline.config import load_config
from pipeline.effects import Commit, xadd
from pipeline.keys import Keys
from pipeline.models import FIELD, Status, decode_outcome, encode, new_id
from pipeline.stage import Runner
from pipeline.submit import new_message
from stages.mock_backend import MockSettings
from stages.retry import Retry
from tests.conftest import eventually
from tests.harness import CHAT, Harness
from tests.test_ingest import client_for
from tests.test_runtime import settings

NO_RETRY = {"LLMQ_QUEUE__RETRY__MAX_RETRIES": "0"}


# --- backend answers ---------------------------------------------------------------------------------------


async def test_an_answer_with_lone_surrogates_completes_once_with_them_replaced(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a backend whose JSON answer holds an escaped lone surrogate (it parses, but cannot be stored)
    body = '{"choices": [{"message": {"role": "assistant", "content": "half \\ud83d of an emoji"}}]}'
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1, body=body)}) as h:
        mid = await h.submit()
        # When it is dispatched, then it completes after one call, the surrogate replaced
        status = (await h.wait_terminal([mid]))[mid]
        calls = h.mocks["a"].calls
    assert status["status"] == "completed" and calls == 1
    content = msgspec.json.decode(status["result"])["choices"][0]["message"]["content"]
    assert content == "half \ufffd of an emoji"


async def test_an_answer_with_an_integer_past_64_bits_fails_once_with_the_reason(
    redis: aioredis.Redis, keys: Keys
) -> None:
    body = '{"choices": [], "usage": {"prompt_tokens": 123456789012345678901234567890}}'
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1, body=body)}) as h:
        mid = await h.submit()
        status = (await h.wait_terminal([mid]))[mid]
        calls = h.mocks["a"].calls
    assert status["status"] == "failed" and calls == 1
    assert "cannot be stored: an integer past 64 bits at usage.prompt_tokens" in status["error"]


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


async def _calls(h: Harness, n: int) -> bool:
    return h.mocks["a"].calls >= n


async def test_scheduler_timeout_bounds_the_whole_call(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a backend that answers within every read timeout but takes 3 s for the whole answer
    backend = MockSettings(latency_ms=1, trickle_s=3.0)
    env = {"LLMQ_SCHEDULER__TIMEOUT": "500ms", **NO_RETRY}
    async with Harness(redis, keys, backends={"a": backend}, env=env) as h:
        started = time.monotonic()
        mid = await h.submit()
        # When it is called, then the call ends at scheduler.timeout, not when the backend is done
        status = (await h.wait_terminal([mid], within=10))[mid]
        elapsed = time.monotonic() - started
    assert status["status"] == "dead" and "timeout after 0.5s" in status["error"]
    assert elapsed < 2.0, elapsed


async def test_dispatch_renews_the_in_flight_leases_of_what_it_holds(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a dispatcher holding a message (waiting for a slot or in a long call) whose in-flight lease
    # would expire in half a second, and another message's lease it does not hold
    async with Harness(redis, keys, backends={"a": MockSettings()}, stages=("dispatch",)) as h:
        [dispatcher] = h.stages
        held, other = new_id(), new_id()
        soon = time.time() + 0.5
        await redis.zadd(keys.inflight("normal"), {held: soon, other: soon})
        dispatcher.held[held] = "normal"  # type: ignore[attr-defined]
        # When a renewal comes round (every third of the claim timeout: 2 s here)
        await asyncio.sleep(1.0)
        assert await redis.zscore(keys.inflight("normal"), held) is not None
        await eventually(lambda: _lease_beyond(redis, keys, held, soon + 1), within=3, what="the lease renewed")
    # Then the held one's lease was extended, the other left to expire
    assert await redis.zscore(keys.inflight("normal"), other) == pytest.approx(soon)


async def _lease_beyond(redis: aioredis.Redis, keys: Keys, member: str, when: float) -> bool:
    score = await redis.zscore(keys.inflight("normal"), member)
    return score is not None and score > when


# --- retry ----------------------------------------------------------------------------------------------------


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


async def _xlen(redis: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await redis.xlen(stream)) >= n


async def test_a_retry_whose_level_was_removed_ends_dead_with_the_reason(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a retry stage whose config no longer has the level "bulk", and two failed messages of it: one
    # arriving now, one already waiting out its backoff
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix})
    retry = Retry(config=config, redis=redis, keys=keys)
    arriving, waiting = (new_message(message_id=new_id(), level="bulk", request=CHAT) for _ in range(2))
    arriving.attempts = waiting.attempts = 1
    commit = Commit(redis, stream=keys.dispatch, group="dispatch", channel=keys.finished)
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


# --- ingest ---------------------------------------------------------------------------------------------------


async def test_idempotency_keys_belong_to_their_caller_and_tenant(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys, {"LLMQ_API_KEYS": "key-a,key-b"}) as http:

        async def post(api_key: str, **body: object) -> httpx.Response:
            doc = {"request": CHAT, "idempotency_key": "k1", **body}
            return await http.post("/api/v1/messages", json=doc, headers={"X-API-Key": api_key})

        first = await post("key-a")
        assert first.status_code == 202
        # Another API key with the same idempotency key gets a message of its own, not the first caller's
        other = await post("key-b")
        assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
        # and so does another tenant of the same caller
        tenant = await post("key-a", tenant="t2")
        assert tenant.status_code == 202 and tenant.json()["id"] not in {first.json()["id"], other.json()["id"]}
        # The same caller repeating the request gets the first message
        again = await post("key-a")
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        # and with a different request, a 422 naming the key
        changed = await post("key-a", level="high")
        assert changed.status_code == 422 and changed.json()["field"] == "idempotency_key"
        assert first.json()["id"] in changed.json()["error"]
        # in a batch too, item by item
        batch = await http.post(
            "/api/v1/messages/batch",
            json=[
                {"request": CHAT, "idempotency_key": "k1"},
                {"request": CHAT, "idempotency_key": "k1", "level": "low"},
            ],
            headers={"X-API-Key": "key-a"},
        )
        assert [r["status_code"] for r in batch.json()] == [200, 422]
        assert batch.json()[1]["field"] == "[1].idempotency_key"
    assert await redis.xlen(keys.level("normal")) == 3


async def test_the_openai_facade_scopes_idempotency_keys_too(redis: aioredis.Redis, keys: Keys) -> None:
    env = {"LLMQ_API_KEYS": "key-a,key-b", "LLMQ_SERVER__SYNC_TIMEOUT": "100ms"}
    async with client_for(redis, keys, env) as http:

        async def post(api_key: str, content: str) -> httpx.Response:
            body = {"model": "m", "messages": [{"role": "user", "content": content}]}
            headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": "same"}
            return await http.post("/v1/chat/completions", json=body, headers=headers)

        first, other = await post("key-a", "hi"), await post("key-b", "hi")
        assert first.headers["x-llmq-message-id"] != other.headers["x-llmq-message-id"]
        changed = await post("key-a", "something else")
        assert changed.status_code == 422 and changed.json()["error"]["param"] == "Idempotency-Key"


async def test_the_native_api_refuses_stream_true(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys) as http:
        response = await http.post("/api/v1/messages", json={"request": {**CHAT, "stream": True}})
    assert response.status_code == 422 and response.json()["field"] == "request.stream"
    assert await redis.xlen(keys.level("normal")) == 0
