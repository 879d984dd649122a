"""Webhooks when a message or a batch ends: signed as the Standard Webhooks spec says (checked with its own
library), retried after a receiver's 500, never again once it answered 2xx, dead-lettered after their
limit and replayable, and never sent to an address outside the allow-list."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmq.pipeline import webhooks
from llmq.pipeline.config.urls import within
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD
from llmq.pipeline.runtime.ops_server import OpsServer
from llmq.stages.archive.cleanup import Cleanup
from llmq.stages.mock_backend import MockSettings
from tests.conftest import eventually
from tests.support.harness import CHAT, Harness
from tests.test_batches import pipeline, requests

SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes, really").decode()


class Receiver:
    """A webhook receiver: answers each delivery with the next status of ``answers`` (then 200), and keeps
    what it was sent."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = list(answers)
        self.received: list[tuple[dict[str, str], bytes, int]] = []

    async def hook(self, request: Request) -> Response:
        status = self.answers.pop(0) if self.answers else 200
        self.received.append((dict(request.headers), await request.body(), status))
        return Response(status_code=status)

    def verified(self) -> list[dict[str, Any]]:
        """The events answered 2xx, each checked by the Standard Webhooks library (it raises on a bad one)."""
        hook = Webhook(SECRET)
        return [hook.verify(body, headers) for headers, body, status in self.received if status < 300]

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _, _ in self.received]


@contextlib.asynccontextmanager
async def receiving(answers: list[int]) -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver(answers)
    server = OpsServer(
        Starlette(routes=[Route("/hooks/{rest:path}", receiver.hook, methods=["POST"])]), host="127.0.0.1", port=0
    )
    server.start()
    try:
        yield receiver, f"http://127.0.0.1:{server.port}/hooks/"
    finally:
        await server.stop()


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQ_TEST_WEBHOOK_SECRET", SECRET)


def hooks_env(allowed: str, **more: str) -> dict[str, str]:
    return {
        "LLMQ_WEBHOOKS__ENDPOINTS": f'[{{url: "{allowed}", secret_env: LLMQ_TEST_WEBHOOK_SECRET}}]',
        "LLMQ_WEBHOOKS__INITIAL_BACKOFF": "100ms",
        "LLMQ_WEBHOOKS__MAX_BACKOFF": "200ms",
        **more,
    }


async def test_a_message_event_is_signed_retried_after_a_500_and_not_sent_again_once_delivered(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    async with receiving([500, 500]) as (receiver, base):
        env = hooks_env(base)
        async with Harness(
            redis, keys, backends={"a": MockSettings(latency_ms=5)}, env=env, database_url=database_url
        ) as h:
            # When a message that names a webhook URL ends
            mid = await h.submit(metadata={"webhook_url": base + "orders"})
            assert (await h.wait_terminal([mid]))[mid]["status"] == "completed"
            # Then its event is delivered after the receiver's two 500s, verified by the spec's library
            await eventually(lambda: _has(receiver.verified, 1), within=15, what="the event delivered")
            [event] = receiver.verified()
            assert event["type"] == "message.completed" and event["data"]["id"] == mid
            assert event["data"]["status"] == "completed"
            # every attempt with one webhook-id, and none after the 2xx (past several backoffs)
            assert len(receiver.received) == 3 and len(set(receiver.ids())) == 1
            await _idle(h, keys)
            assert len(receiver.received) == 3


async def _has(read: Any, n: int) -> bool:
    return len(read()) >= n


async def _idle(h: Harness, keys: Keys) -> None:
    """Until nothing waits to be delivered again."""

    async def none_due() -> bool:
        pending: Any = await h.redis.xpending(keys.webhooks, "retry")
        return await h.redis.zcard(keys.webhooks_due) == 0 and int(pending["pending"]) == 0

    await eventually(none_due, within=10, what="no delivery left")


async def test_a_delivery_that_keeps_failing_is_dead_lettered_and_replayed(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    async with receiving([500, 503, 502]) as (receiver, base):
        env = hooks_env(base, LLMQ_WEBHOOKS__MAX_ATTEMPTS="3")
        backends = {"a": MockSettings(latency_ms=5, fail_rate=1.0, fail_status=400)}
        async with Harness(redis, keys, backends=backends, env=env, database_url=database_url) as h:
            # When a message fails (a 400) and its receiver fails every one of the 3 deliveries allowed
            mid = await h.submit(metadata={"webhook_url": base + "x"})
            assert (await h.wait_terminal([mid]))[mid]["status"] == "failed"

            async def dead() -> bool:
                return await redis.xlen(keys.dlq) == 1

            await eventually(dead, within=15, what="the delivery dead-lettered")
            assert len(receiver.received) == 3
            # Then the dead letter says what failed, and a replay (the receiver well again) delivers it
            letters = (await h.http.get("/api/v1/dlq")).json()
            assert "failed 3 times: answered 502" in letters[0]["reason"]
            replayed = await h.http.post(f"/api/v1/dlq/{letters[0]['entry_id']}/replay")
            assert replayed.status_code == 200, replayed.text
            await eventually(lambda: _has(receiver.verified, 1), within=15, what="the replayed event delivered")
            [event] = receiver.verified()
            assert event["type"] == "message.failed" and "400" in event["data"]["error"]
            assert len(set(receiver.ids())) == 1 and await redis.xlen(keys.dlq) == 0


async def test_a_webhook_url_outside_the_allow_list_is_refused(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    env = hooks_env("https://hooks.example.com/llmq/")
    async with Harness(redis, keys, backends={"a": MockSettings()}, env=env, database_url=database_url) as h:
        for url in ("http://169.254.169.254/latest/meta-data", "https://hooks.example.com.evil.test/llmq/", 7):
            refused = await h.http.post("/api/v1/messages", json={"request": CHAT, "metadata": {"webhook_url": url}})
            assert refused.status_code == 422 and refused.json()["field"] == "metadata.webhook_url", refused.text
        allowed = await h.http.post(
            "/api/v1/messages", json={"request": CHAT, "metadata": {"webhook_url": "https://hooks.example.com/llmq/a"}}
        )
        assert allowed.status_code == 202


async def test_a_batch_announces_its_end(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    async with (
        receiving([]) as (receiver, base),
        pipeline(redis, keys, database_url, MockSettings(latency_ms=5), hooks_env(base)) as (_, client),
    ):
        uploaded = await client.files.create(file=("in.jsonl", requests(10)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"webhook_url": base + "batches"},
        )
        await eventually(lambda: _has(receiver.verified, 1), within=30, what="the batch's event")
    [event] = receiver.verified()
    assert event["type"] == "batch.completed" and event["data"]["id"] == batch.id
    assert event["data"]["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    # (its lines send no event of their own)
    assert len(receiver.received) == 1
    assert json.loads(receiver.received[0][1])["data"]["output_file_id"]


@pytest.mark.parametrize(
    ("prefix", "url", "inside"),
    [
        ("https://hooks.example.com/llmq/", "https://hooks.example.com/llmq/a", True),
        ("https://hooks.example.com/llmq/", "https://HOOKS.example.com:443/llmq/a", True),
        ("https://hooks.example.com", "https://hooks.example.com/", True),
        ("https://hooks.example.com/hooks", "https://hooks.example.com/hooks/a", True),
        ("https://hooks.example.com/hooks", "https://hooks.example.com/hooksx", False),
        ("https://hooks.example.com", "https://hooks.example.com@evil.test/", False),
        ("https://hooks.example.com", "https://hooks.example.com:x@169.254.169.254/", False),
        ("https://hooks.example.com", "https://hooks.example.com.evil.test/", False),
        ("http://10.0.0.1", "http://10.0.0.10/", False),
        ("http://127.0.0.1:80", "http://127.0.0.1:8000/", False),
        ("https://hooks.example.com/llmq/", "https://hooks.example.com/llmq/../admin/reset", False),
        ("https://hooks.example.com/llmq/", "https://hooks.example.com/llmq/%2e%2e/admin", False),
        ("https://hooks.example.com/llmq/", "https://hooks.example.com/llmq/\\..\\admin", False),
        ("https://hooks.example.com/llmq/", "http://hooks.example.com/llmq/a", False),
        ("https://hooks.example.com/llmq/", "https://hooks.example.com/llmq/a b", False),
    ],
)
def test_a_url_is_under_an_allowed_prefix_by_its_parts_not_its_text(prefix: str, url: str, inside: bool) -> None:
    # (text comparison let each of the False ones pass, and the HTTP client then called another host or path)
    assert within(prefix, url) is inside


async def test_endpoints_are_named_to_nobody_and_bound_to_their_tenants(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    env = {
        "LLMQ_WEBHOOKS__ENDPOINTS": (
            '[{url: "https://hooks.acme.test/", secret_env: LLMQ_TEST_WEBHOOK_SECRET, tenants: [acme]},'
            ' {url: "https://hooks.globex.test/?token=s3cr3t", secret_env: LLMQ_TEST_WEBHOOK_SECRET,'
            " tenants: [globex]}]"
        )
    }
    async with Harness(redis, keys, backends={"a": MockSettings()}, env=env, database_url=database_url) as h:
        body = {"request": CHAT, "tenant": "acme", "metadata": {"webhook_url": "https://hooks.globex.test/orders"}}
        refused = await h.http.post("/api/v1/messages", json=body)
        # acme cannot have its events signed with globex's secret, and the error names no endpoint
        assert refused.status_code == 422 and "s3cr3t" not in refused.text and "globex" not in refused.text
        body["metadata"] = {"webhook_url": "https://hooks.acme.test/orders"}
        assert (await h.http.post("/api/v1/messages", json=body)).status_code == 202


async def test_a_hanging_receiver_holds_only_its_own_deliveries(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    hanging = asyncio.Event()
    seen: list[str] = []

    async def hang(request: Request) -> Response:
        seen.append("hang")
        await hanging.wait()
        return Response(status_code=200)

    server = OpsServer(Starlette(routes=[Route("/hang", hang, methods=["POST"])]), host="127.0.0.1", port=0)
    server.start()
    try:
        async with receiving([]) as (receiver, base):
            env = hooks_env(base) | {
                "LLMQ_WEBHOOKS__ENDPOINTS": f'[{{url: "{base}", secret_env: LLMQ_TEST_WEBHOOK_SECRET}},'
                f' {{url: "http://127.0.0.1:{server.port}/hang", secret_env: LLMQ_TEST_WEBHOOK_SECRET}}]',
                "LLMQ_WEBHOOKS__TIMEOUT": "20s",
                "LLMQ_QUEUE__WORKER__MAX_BATCH_SIZE": "8",
            }
            async with Harness(redis, keys, backends={"a": MockSettings()}, env=env, database_url=database_url):
                # Given 8 deliveries to a receiver that hangs (a batch's worth)
                for i in range(8):
                    d = webhooks.event(
                        "message", f"m{i}", "message.completed", {}, f"http://127.0.0.1:{server.port}/hang"
                    )
                    await redis.xadd(keys.webhooks, {FIELD: webhooks.encode(d)})
                await eventually(lambda: _has(lambda: seen, 8), within=10, what="the 8 hanging deliveries")
                # When one more goes to a healthy receiver, then it is delivered while they hang
                d = webhooks.event("message", "ok", "message.completed", {}, base + "ok")
                await redis.xadd(keys.webhooks, {FIELD: webhooks.encode(d)})
                await eventually(lambda: _has(receiver.verified, 1), within=5, what="the healthy delivery")
                hanging.set()
    finally:
        hanging.set()
        await server.stop()


async def test_delivered_events_leave_redis_and_an_unreadable_letter_does_not_block_replays(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    async with (
        receiving([]) as (receiver, base),
        Harness(
            redis, keys, backends={"a": MockSettings(latency_ms=5)}, env=hooks_env(base), database_url=database_url
        ) as h,
    ):
        mid = await h.submit(metadata={"webhook_url": base + "x"})
        await h.wait_terminal([mid])
        await eventually(lambda: _has(receiver.verified, 1), within=15, what="the event delivered")
        await _idle(h, keys)
        # Then the cleanup trims the webhooks stream as it trims the others
        await Cleanup(config=h.config, redis=redis, keys=keys).cleanup()
        assert await redis.xlen(keys.webhooks) == 0
        # and a webhook dead letter that holds no delivery is refused a replay (422), never a 500
        await redis.xadd(keys.dlq, {FIELD: b"\x07", "reason": "poison", "stream": keys.webhooks})
        letter = (await h.http.get("/api/v1/dlq")).json()[0]
        replayed = await h.http.post(f"/api/v1/dlq/{letter['entry_id']}/replay")
        assert replayed.status_code == 422 and "holds no webhook delivery" in replayed.json()["error"]


def test_a_message_that_ends_again_is_a_new_event_and_a_redelivery_the_same() -> None:
    first = webhooks.event("message", "m1", "message.failed", {"error": "a"}, "https://h/", end="1.0")
    again = webhooks.event("message", "m1", "message.failed", {"error": "a"}, "https://h/", end="1.0")
    replayed = webhooks.event("message", "m1", "message.failed", {"error": "b"}, "https://h/", end="2.0")
    assert first.id == again.id != replayed.id
