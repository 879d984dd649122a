"""webhooks: deliver the events of ended messages and batches (``llmq.pipeline.webhooks``), run in the retry
stage's process beside it (``llmq-stage run retry``: the retry group reads the ``webhooks`` stream too, under
its consumer name's lease): a delivery that fails is retried with backoff, as a message is, and
dead-lettered after ``webhooks.max_attempts``.

A delivery answered 2xx is acked; any other answer, a timeout or a connection error waits out its backoff in
a due set (moved back by ``scripts/webhook_due-3.lua``) with its attempt counted. A URL no longer under
``webhooks.endpoints`` (the allow-list changed), or whose secret is missing, is dead-lettered at once.
Redirects are not followed: a receiver cannot send llmq's request elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import aiohttp
import redis.asyncio as aioredis
from prometheus_client import Counter

from llmq.pipeline import background, webhooks
from llmq.pipeline.backoff import retry_delay
from llmq.pipeline.config import Config
from llmq.pipeline.config.urls import within
from llmq.pipeline.dlq import dead_letter
from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.lua import Lua
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime import effects
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.stage import Stage
from llmq.pipeline.runtime.streams import Entry

log = logging.getLogger("llmq.webhooks")

DELIVERED = Counter("llmq_webhooks_total", "Webhook deliveries, by outcome", ["outcome"])
MOVE_EVERY_S = 0.25
IN_HAND = 256
"""Deliveries in progress at once: a receiver that hangs until the timeout holds its own, not the others'."""
REPLY_READ_MAX = 64 * 1024
"""What is read of a receiver's answer (its status is what counts): a huge body is not held in memory."""


class WebhookSender(Stage):
    def __init__(self, *, config: Config, redis: aioredis.Redis, keys: Keys) -> None:
        self.name = Group.RETRY.value
        self.stream = keys.webhooks
        self.config = config
        self.redis = redis
        self.keys = keys
        self.hooks = config.webhooks
        self.max_in_hand = IN_HAND
        self._move = Lua(redis, "webhook_due")
        self._session: aiohttp.ClientSession | None = None
        self._timer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.hooks.timeout.seconds))
        self._timer = asyncio.create_task(self._timer_loop(), name="webhooks-due")

    async def close(self) -> None:
        await background.cancel(self._timer)
        if self._session is not None:
            await self._session.close()

    async def handle(self, batch: Batch) -> None:
        await asyncio.gather(*(self._deliver(batch, entry) for entry in batch.entries))

    async def _deliver(self, batch: Batch, entry: Entry) -> None:
        try:
            delivery = webhooks.decode(entry.data)
        except Exception as exc:  # a boundary: what cannot be read is kept, never retried
            batch.ack(entry, self._dead(entry.data, None, f"not a webhook delivery: {exc}"))
            return
        endpoint = next((e for e in self.hooks.endpoints if within(e.url, delivery.url)), None)
        secret = os.environ.get(endpoint.secret_env, "").strip() if endpoint is not None else ""
        if endpoint is None or not secret:
            why = "its URL is under no webhooks.endpoints" if endpoint is None else f"${endpoint.secret_env} is unset"
            batch.ack(entry, self._dead(entry.data, delivery, f"webhook to {delivery.url} not sent: {why}"))
            return
        assert self._session is not None
        try:
            headers = webhooks.headers(secret, delivery)
            async with self._session.post(
                delivery.url, data=delivery.body, headers=headers, allow_redirects=False
            ) as reply:
                await reply.content.read(REPLY_READ_MAX)
                ok, why = 200 <= reply.status < 300, f"answered {reply.status}"
        except ValueError as exc:  # the secret is no base64
            batch.ack(entry, self._dead(entry.data, delivery, f"webhook to {delivery.url}: bad secret: {exc}"))
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if ok:
            DELIVERED.labels(outcome="delivered").inc()
            batch.ack(entry)
            return
        attempts = delivery.attempts + 1
        if attempts >= self.hooks.max_attempts:
            DELIVERED.labels(outcome="dead").inc()
            reason = f"webhook to {delivery.url} failed {attempts} times: {why}"
            log.warning("%s (event %s)", reason, delivery.id)
            batch.ack(entry, self._dead(webhooks.encode(_again(delivery, attempts)), delivery, reason))
            return
        DELIVERED.labels(outcome="retried").inc()
        delay = retry_delay(
            attempts, initial_s=self.hooks.initial_backoff.seconds, factor=2.0, max_s=self.hooks.max_backoff.seconds
        )
        member = f"{delivery.id}:{attempts}"
        batch.ack(
            entry,
            effects.hset(self.keys.webhooks_payloads, {member: webhooks.encode(_again(delivery, attempts))}),
            effects.zadd(self.keys.webhooks_due, member, time.time() + delay),
        )

    def _dead(self, payload: bytes, delivery: webhooks.Delivery | None, reason: str) -> effects.Effect:
        fields = {b"event_id": delivery.id, b"url": delivery.url} if delivery is not None else {}
        return dead_letter(
            self.keys, payload=payload, message_id=None, reason=reason, source=self.keys.webhooks, fields=fields
        )

    async def move_due(self, now: float | None = None, limit: int = 500) -> int:
        keys = [self.keys.webhooks_due, self.keys.webhooks_payloads, self.keys.webhooks]
        return int(await self._move(keys, [now or time.time(), limit]))

    async def _timer_loop(self) -> None:
        while True:
            try:
                while await self.move_due() > 0:
                    pass
            except UNAVAILABLE as exc:
                log.warning("webhook timer paused, redis unavailable: %s", exc)
            except Exception:  # a loop boundary: due deliveries must go on being moved back
                log.error("webhook timer failed", exc_info=True)
            await asyncio.sleep(MOVE_EVERY_S)


def _again(d: webhooks.Delivery, attempts: int) -> webhooks.Delivery:
    return webhooks.Delivery(id=d.id, url=d.url, body=d.body, attempts=attempts)
