"""ingest: messages enter their level stream and status hash together; bad input gets a 4xx naming it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from pipeline.config import load_config
from pipeline.keys import Keys
from pipeline.models import FIELD, decode_message
from stages.ingest import create_app

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


async def client_for(redis: aioredis.Redis, keys: Keys, env: dict[str, str] | None = None) -> httpx.AsyncClient:
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix, **(env or {})})
    app = create_app(config, redis=redis, keys=keys)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def http(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for(redis, keys) as client:
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
    async with await client_for(redis, keys, {"LLMQ_SERVER__MAX_BODY_BYTES": "100"}) as http:
        big = {"request": {"messages": [{"role": "user", "content": "x" * 200}]}}
        assert (await http.post("/api/v1/messages", json=big)).status_code == 413


async def test_unknown_or_malformed_ids_are_404(http: httpx.AsyncClient) -> None:
    for message_id in ("01a2-nope", "a:b", "..", "x" * 100):
        assert (await http.get(f"/api/v1/messages/{message_id}")).status_code == 404


async def test_api_keys_are_required_when_configured(redis: aioredis.Redis, keys: Keys) -> None:
    async with await client_for(redis, keys, {"LLMQ_API_KEYS": "k-one,k-two"}) as http:
        assert (await http.post("/api/v1/messages", json={"request": CHAT})).status_code == 401
        wrong = {"Authorization": "Bearer k-three"}
        assert (await http.post("/api/v1/messages", json={"request": CHAT}, headers=wrong)).status_code == 401
        ok = await http.post("/api/v1/messages", json={"request": CHAT}, headers={"Authorization": "Bearer k-two"})
        assert ok.status_code == 202
        ok = await http.post("/api/v1/messages", json={"request": CHAT}, headers={"X-API-Key": "k-one"})
        assert ok.status_code == 202
        # health and metrics stay open for probes and scrapers
        assert (await http.get("/api/v1/health")).status_code == 200


async def test_health_and_metrics(http: httpx.AsyncClient) -> None:
    await http.post("/api/v1/messages", json={"level": "low", "request": CHAT})
    assert (await http.get("/api/v1/health")).json() == {"status": "ok", "checks": {"redis": "ok"}}
    metrics = (await http.get("/metrics")).text
    assert 'llmq_messages_ingested_total{level="low"}' in metrics
    assert 'http_requests_total{method="POST",path="/api/v1/messages",status="202"}' in metrics
    assert (await http.get("/api/v1/metrics")).text.startswith("#")


async def test_health_is_503_when_redis_is_down(keys: Keys) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    async with await client_for(dead, keys) as http:
        response = await http.get("/api/v1/health")
        assert response.status_code == 503 and response.json()["status"] == "down"
        submit = await http.post("/api/v1/messages", json={"request": CHAT})
        assert submit.status_code == 503
    await dead.aclose()
