"""Notices over Redis Pub/Sub instead of polling: one subscription per process.

Every stage that ends messages publishes their ids, separated by spaces, on the ``finished`` channel, one
notice per commit of outcomes (``scripts/commit.lua``); releasing an in-flight slot otherwise publishes on
``slots``. A Waiter wakes only the requests waiting for those ids, so a thousand long-polls
cost one Redis connection, not a thousand BLPOPs; the scheduler's arbiter wakes on either channel to
admit the next message at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from llmq.pipeline import background
from llmq.pipeline.backoff import Backoff
from llmq.pipeline.keys import Keys
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime.streams import as_str

log = logging.getLogger("llmq.notify")
CLOSE_TIMEOUT_S = 2.0


class Listener:
    """Calls ``on_message(channel, data)`` for every message on ``channels``; re-subscribes with backoff
    when the connection drops. ``subscribed`` is set while the subscription is live."""

    def __init__(self, *, redis: aioredis.Redis, channels: list[str], on_message: Callable[[str, str], None]) -> None:
        self.redis = redis
        self.channels = channels
        self.on_message = on_message
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="listener")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=CLOSE_TIMEOUT_S)
            if not done:
                log.warning("listener of %s did not stop within %gs", self.channels, CLOSE_TIMEOUT_S)

    async def _listen(self) -> None:
        backoff = Backoff(initial_s=0.1, max_s=5.0)
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self.channels)
                self.subscribed.set()
                backoff.reset()
                async for notice in pubsub.listen():
                    self.on_message(as_str(notice["channel"]), as_str(notice["data"]))
            except UNAVAILABLE as exc:
                self.subscribed.clear()
                log.warning("subscription to %s lost, re-subscribing: %s", self.channels, exc)
                await asyncio.sleep(backoff.next())
            except Exception:  # a loop boundary: notices must keep waking waiters (who also poll meanwhile)
                self.subscribed.clear()
                log.error("subscription to %s failed, re-subscribing", self.channels, exc_info=True)
                await asyncio.sleep(backoff.next())
            finally:
                # Bounded: closing a connection whose read was just cancelled must not hold up shutdown.
                with contextlib.suppress(TimeoutError, *UNAVAILABLE):
                    await asyncio.wait_for(pubsub.aclose(), timeout=CLOSE_TIMEOUT_S)  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis 8


class Waiter:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._listener = Listener(redis=redis, channels=[keys.finished], on_message=self._notice)

    def start(self) -> None:
        self._listener.start()

    async def close(self) -> None:
        await self._listener.close()

    def _notice(self, _: str, message_ids: str) -> None:
        for message_id in message_ids.split():
            for event in self._waiting.get(message_id, ()):
                event.set()

    async def wait(self, message_id: str, is_done: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
        """Return True once ``is_done()`` holds, False after ``timeout_s``. ``is_done`` is checked after
        subscribing, so a message finishing in between is not missed; notices only trigger re-checks."""
        event = asyncio.Event()
        self._waiting[message_id].add(event)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            await background.wait_event(self._listener.subscribed, min(timeout_s, 2.0))
            while True:
                if await is_done():
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                # A notice wakes us; without the subscription (Redis restarting) re-check every second.
                await background.wait_event(event, min(remaining, 1.0))
                event.clear()
        finally:
            waiters = self._waiting.get(message_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiting[message_id]
