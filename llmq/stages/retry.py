"""retry: hold failed messages for their backoff, then put them back in their level stream; dead-letter
those that used up ``queue.retry.max_retries``.

A failed message waits in ``retry:due`` (a sorted set scored by due time; member ``<level>:<id>``) with its
payload in ``retry:payloads``. A timer moves due messages back with one Lua script
(``scripts/move_due.lua``: XADD level stream, ZREM, HDEL, status "queued"), so a crash between steps
neither loses nor duplicates one. A message cancelled while it waits ends cancelled; one whose level was
removed from the config ends dead with that reason; a backoff never reaches past the message's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from llmq.pipeline import background, transitions
from llmq.pipeline.backoff import retry_delay
from llmq.pipeline.config import Config
from llmq.pipeline.dlq import dead_letter
from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.lua import Lua
from llmq.pipeline.models import Message, Outcome, Status, decode_message
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime import effects
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.stage import Stage
from llmq.pipeline.runtime.streams import Entry

log = logging.getLogger("llmq.retry")

RETRIES = Counter("llmq_retries_total", "Failed attempts scheduled for another try", ["level", "reason"])
SCHEDULED = Gauge("llmq_retry_scheduled", "Messages waiting for their retry backoff")
DEAD = Counter("llmq_dead_letters_total", "Messages dead-lettered after max_retries")


_ATTEMPT = re.compile(r"attempt \d+(?: on .*?)? at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: ")
"""The head of a line of a message's ``errors`` (``llmq.stages.dispatch.attempt_line``)."""


def reason_of(error: str) -> str:
    """A short label for metrics: timeout, connection, http_<status>, no_backend or other. ``error`` may be
    a line of a message's ``errors`` (``attempt N on <backend> at <time>: <error>``)."""
    error = _ATTEMPT.sub("", error, count=1)
    if error.startswith("timeout"):
        return "timeout"
    if error.startswith("connection"):
        return "connection"
    if " answered " in error:
        return "http_" + error.split(" answered ", 1)[1][:3]
    if "backend" in error:
        return "no_backend"
    return "other"


class Retry(Stage):
    def __init__(self, *, config: Config, redis: aioredis.Redis, keys: Keys) -> None:
        self.name = Group.RETRY.value
        self.stream = keys.retry
        self.config = config
        self.redis = redis
        self.keys = keys
        self.levels = [lv.name for lv in config.queue.levels]
        self.retention_s = config.queue.result_retention.seconds
        self._move = Lua(redis, "move_due")
        self._timer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._timer = asyncio.create_task(self._timer_loop(), name="retry-timer")

    async def close(self) -> None:
        await background.cancel(self._timer)

    async def handle(self, batch: Batch) -> None:
        """Idempotent: the due set is keyed by level and message id, and each entry's effects commit with its
        ack, so a redelivered entry re-schedules the same member and an ended message is recorded once."""
        r = self.config.queue.retry
        now = time.time()
        messages = [decode_message(entry.data) for entry in batch.entries]
        pipe = self.redis.pipeline(transaction=False)
        for msg in messages:
            pipe.hget(self.keys.msg(msg.id), "status")
        statuses = await pipe.execute()
        for entry, msg, raw in zip(batch.entries, messages, statuses, strict=True):
            status = Status(raw.decode()) if raw else None
            last_error = msg.errors[-1] if msg.errors else "unknown error"
            if status is Status.CANCELLED:
                # cancelled while it waited to be retried: it never runs again
                outcome = Outcome(message=msg, status=Status.CANCELLED, finished_at=now)
                batch.ack(entry, transitions.ended(self.keys, outcome, retention_s=self.retention_s))
                continue
            if status is not None and status.terminal:
                batch.ack(entry)  # ended already (a redelivery of an entry settled meanwhile): nothing more
                continue
            if msg.level not in self.levels:
                reason = f"level {msg.level!r} is no longer configured"
                self._dead(batch, entry, msg, reason, f"{last_error}; {reason}", now)
                continue
            if msg.attempts > r.max_retries:
                self._dead(
                    batch, entry, msg, f"failed {msg.attempts} attempts (max_retries {r.max_retries})", last_error, now
                )
                continue
            delay = retry_delay(
                msg.attempts,
                initial_s=r.initial_backoff.seconds,
                factor=r.factor,
                max_s=r.max_backoff.seconds,
                retry_after_s=msg.retry_after,
            )
            if msg.deadline is not None:
                delay = min(delay, max(0.0, msg.deadline - now))  # back in time to expire, not later
            member = f"{msg.level}:{msg.id}"
            batch.ack(
                entry,
                effects.hset(self.keys.retry_payloads, {member: entry.data}),
                effects.zadd(self.keys.retry_due, member, now + delay),
                transitions.retrying(self.keys, msg.id, retry_at=now + delay),
            )
            RETRIES.labels(level=msg.level, reason=reason_of(last_error)).inc()

    def _dead(self, batch: Batch, entry: Entry, msg: Message, reason: str, error: str, now: float) -> None:
        letter = dead_letter(
            self.keys,
            payload=msgspec.msgpack.encode(msg),
            message_id=msg.id,
            reason=reason,
            source=self.keys.retry,
            fields={b"error": error, b"errors": msgspec.json.encode(msg.errors)},
        )
        outcome = Outcome(message=msg, status=Status.DEAD, error=error, finished_at=now)
        effect = transitions.ended(self.keys, outcome, retention_s=self.retention_s, cancellable=True)
        batch.ack(entry, letter, effect)
        DEAD.inc()
        log.warning(
            "message %s dead-lettered (%s): %s",
            msg.id,
            reason,
            error[:200],
            extra={"message_id": msg.id, "level_name": msg.level, "backend": msg.failed_backend or "-"},
        )

    async def move_due(self, now: float | None = None, limit: int = 500) -> int:
        keys = [self.keys.retry_due, self.keys.retry_payloads, self.keys.retry]
        keys += [self.keys.level(n) for n in self.levels]
        args: list[str | float | int] = [now or time.time(), limit, self.keys.msg(""), *self.levels]
        return int(await self._move(keys, args))

    async def _timer_loop(self) -> None:
        while True:
            try:
                while await self.move_due() > 0:
                    pass
                head = await self.redis.zrange(self.keys.retry_due, 0, 0, withscores=True)
                SCHEDULED.set(await self.redis.zcard(self.keys.retry_due))
                wait = 0.25 if not head else min(0.25, max(0.0, float(head[0][1]) - time.time()))
                await asyncio.sleep(max(wait, 0.001))
            except UNAVAILABLE as exc:
                log.warning("retry timer paused, redis unavailable: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:  # a loop boundary: due messages must go on being moved back
                log.error("retry timer failed", exc_info=True)
                await asyncio.sleep(1.0)
