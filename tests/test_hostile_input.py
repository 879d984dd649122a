"""Hostile input, written by hand beside schemathesis: huge and deeply nested bodies, invalid UTF-8, ids
made of key syntax, out-of-range numbers, thousands of concurrent duplicates. Every answer is a 4xx (or
the normal 2xx) with a JSON error naming what is wrong; nothing is half-written; no client text becomes
part of a Redis key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys
from tests.support.clients import client_for
from tests.support.harness import CHAT

JSON = {"content-type": "application/json"}
USER = b'"messages": [{"role": "user", "content": "x"}]'
DEEP = 100_000
EVIL = "a:*\n..\r\n*:{x}/../FLUSHALL"


@pytest.fixture
async def http(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(redis, keys) as client:
        yield client


def assert_clean_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    doc: dict[str, Any] = response.json()
    assert doc["error"]
    return doc


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"request": {"messages": [{"role": "user", "content": ' + b"[" * DEEP + b"]" * DEEP + b"}]}}", 400, "deep"),
        (b'{"request": {' + USER + b'}, "metadata": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}", 400, "deep"),
        (b'{"request": {"messages": [{"role": "user", "content": "\xff\xfe"}]}}', 400, "UTF-8"),
        (b'{"request": {"messages": [{"role": "user", "content": "\xc3"}]}}', 400, "UTF-8"),
        (b'{"request": {' + USER + b', "seed": 18446744073709551616}}', 422, "64 bits"),
        (b'{"request": {' + USER + b', "max_tokens": -9223372036854775809}}', 422, "64 bits"),
        (b'{"request": {' + USER + b', "temperature": 1e999}}', 422, "out of range"),
        (b'{"request": {' + USER + b'}, "deadline_ms": 100000000000000000000000}', 422, "deadline_ms"),
        (b'{"request": {' + USER + b'}, "deadline_ms": -5}', 422, "deadline_ms"),
        (b'{"request": {' + USER + b'}, "deadline_ms": 1.5}', 422, "deadline_ms"),
        (b'{"request": {' + USER + b'}, "session_id": "' + b"s" * 300 + b'"}', 422, "session_id"),
        (b"[1, 2]", 422, "object"),
        (b"null", 422, "object"),
        (b"", 400, "malformed"),
        (b"\x00\x01\x02", 400, "malformed"),
    ],
    ids=[
        "deep-request",
        "deep-metadata",
        "invalid-utf8",
        "truncated-utf8",
        "int-over-64-bits",
        "int-under-64-bits",
        "float-overflow",
        "huge-deadline",
        "negative-deadline",
        "fractional-deadline",
        "long-session-id",
        "array",
        "null",
        "empty",
        "binary",
    ],
)
async def test_a_hostile_body_is_rejected_with_a_clear_error_and_writes_nothing(
    http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys, body: bytes, status: int, says: str
) -> None:
    doc = assert_clean_error(await http.post("/api/v1/messages", content=body, headers=JSON), status)
    assert says in doc["error"] + doc.get("field", ""), doc
    # the batch endpoint and the OpenAI facade reject the same bytes the same way
    batch = await http.post("/api/v1/messages/batch", content=b"[" + body + b"]", headers=JSON)
    assert batch.status_code in (200, 400, 422), batch.text
    if batch.status_code == 200 and body:
        [item] = batch.json()
        assert item["status_code"] == status and item["error"], item
    assert await redis.keys(f"{keys.prefix}*") == []


async def test_an_endless_body_is_cut_off_at_the_limit(
    http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys
) -> None:
    async def endless() -> AsyncIterator[bytes]:  # chunked: no Content-Length to reject it up front
        yield b'{"request": {"messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"x" * 65536

    assert_clean_error(await http.post("/api/v1/messages", content=endless(), headers=JSON), 413)
    lying = {**JSON, "content-length": str(10**12)}
    assert_clean_error(await http.post("/api/v1/messages", content=b"{}", headers=lying), 413)
    assert await redis.keys(f"{keys.prefix}*") == []


async def test_deep_or_invalid_bodies_get_openai_shaped_errors(http: httpx.AsyncClient) -> None:
    for body in (b'{"model": "m", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}", b'{"model": "\xff"}'):
        response = await http.post("/v1/chat/completions", content=body, headers=JSON)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


async def test_ids_made_of_key_syntax_are_data_never_keys(
    http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a message whose session, tenant, idempotency key and metadata are made of Redis key syntax
    body = {"request": CHAT, "session_id": EVIL, "tenant": EVIL, "idempotency_key": EVIL, "metadata": {EVIL: EVIL}}
    accepted = await http.post("/api/v1/messages", json=body)
    assert accepted.status_code == 202, accepted.text
    message_id = accepted.json()["id"]
    before = sorted(await redis.keys("*"))
    # When the same text is used as a message id in every route that takes one
    for bad_id in (EVIL, "*", "..", "a:b", "%0A", f"{message_id}:x", f"{message_id}\n", "../" + message_id):
        for method in ("GET", "DELETE"):
            response = await http.request(method, f"/api/v1/messages/{quote(bad_id, safe='')}")
            assert_clean_error(response, 404)
    # Then no key was made or touched, and the key names hold none of the client's text
    assert sorted(await redis.keys("*")) == before
    ours = [k.decode() for k in await redis.keys(f"{keys.prefix}*")]
    assert all(EVIL not in k and "FLUSHALL" not in k and "\n" not in k for k in ours), ours
    # while the text itself is kept, unchanged, as data
    status = (await http.get(f"/api/v1/messages/{message_id}")).json()
    assert status["status"] == "queued"
    again = await http.post("/api/v1/messages", json=body)
    assert again.status_code == 200 and again.json()["id"] == message_id


async def test_thousands_of_concurrent_duplicates_make_one_message(
    http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys
) -> None:
    body = {"request": CHAT, "idempotency_key": "order-7"}
    singles = [http.post("/api/v1/messages", json=body) for _ in range(2000)]
    batches = [http.post("/api/v1/messages/batch", json=[body] * 50) for _ in range(20)]
    responses = await asyncio.gather(*singles, *batches)
    codes = [r.status_code for r in responses[:2000]]
    items = [item for r in responses[2000:] for item in r.json()]
    ids = {r.json()["id"] for r in responses[:2000]} | {item["id"] for item in items}
    assert len(ids) == 1
    assert codes.count(202) + sum(item["status_code"] == 202 for item in items) == 1
    assert await redis.xlen(keys.level("normal")) == 1


@pytest.mark.parametrize("wait", ["-1", "1e400", "nan", "inf", "abc", "61", ""])
async def test_out_of_range_query_numbers_are_422(http: httpx.AsyncClient, wait: str) -> None:
    message_id = (await http.post("/api/v1/messages", json={"request": CHAT})).json()["id"]
    doc = assert_clean_error(await http.get(f"/api/v1/messages/{message_id}?wait={wait}"), 422)
    assert doc["field"] == "wait"
