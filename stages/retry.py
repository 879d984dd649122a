"""retry: hold failed messages for their backoff, then put them back in their level stream; dead-letter
those that used up ``queue.retry.max_retries``.

A failed message waits in ``retry:due`` (a sorted set scored by due time; member ``<level>:<id>``) with its
payload in ``retry:payloads``. A timer moves due messages back with one Lua script (XADD level stream,
ZREM, HDEL, status "queued"), so a crash between steps neither loses nor duplicates one.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from pipeline import tasks
from pipeline.backoff import retry_delay
from pipeline.config import Config
from pipeline.keys import Keys
from pipeline.lua import Lua
from pipeline.models import FIELD, Message, Outcome, Status, decode_message
from pipeline.outcomes import record_outcome
from pipeline.redis import CONNECTION_ERRORS
from pipeline.stage import Batch, Stage

log = logging.getLogger("llmq.retry")

RETRIES = Counter("llmq_retries_total", "Failed attempts scheduled for another try", ["level", "reason"])
SCHEDULED = Gauge("llmq_retry_scheduled", "Messages waiting for their retry backoff")
DEAD = Counter("llmq_dead_letters_total", "Messages dead-lettered after max_retries")

# KEYS: due set, payload hash, then one stream per level. ARGV: now, max to move, the status-hash key
# prefix (same hash tag, so the same slot), then the level names in KEYS order. Returns the number moved.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local streams = {}
for i = 4, #ARGV do streams[ARGV[i]] = KEYS[i - 1] end
local moved = 0
for _, member in ipairs(due) do
  local sep = string.find(member, ':', 1, true)
  local level, id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  local payload = redis.call('HGET', KEYS[2], member)
  local stream = streams[level]
  if payload and stream then
    redis.call('XADD', stream, '*', 'm', payload)
    if redis.call('HGET', ARGV[3] .. id, 'status') ~= 'cancelled' then
      redis.call('HSET', ARGV[3] .. id, 'status', 'queued')
    end
    moved = moved + 1
  end
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[2], member)
end
return moved
"""


def reason_of(error: str) -> str:
    """A short label for metrics: timeout, connection, http_<status>, no_backend or other."""
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
        self.name = "retry"
        self.stream = keys.retry
        self.config = config
        self.redis = redis
        self.keys = keys
        self.levels = [lv.name for lv in config.queue.levels]
        self.retention_s = config.queue.result_retention.seconds
        self._move = Lua(redis, _MOVE_DUE)
        self._timer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._timer = asyncio.create_task(self._timer_loop(), name="retry-timer")

    async def close(self) -> None:
        await tasks.cancel(self._timer)

    async def handle(self, batch: Batch) -> None:
        """Idempotent: the due set is keyed by level and message id, so a redelivered entry re-schedules the
        same member; a dead message is recorded again with the same outcome."""
        r = self.config.queue.retry
        now = time.time()
        for entry in batch.entries:
            msg = decode_message(entry.data)
            last_error = msg.errors[-1] if msg.errors else "unknown error"
            if msg.attempts > r.max_retries:
                self._dead(batch, msg, last_error, now)
                batch.ack(entry)
                continue
            delay = retry_delay(
                msg.attempts,
                initial_s=r.initial_backoff.seconds,
                factor=r.factor,
                max_s=r.max_backoff.seconds,
                retry_after_s=msg.retry_after,
            )
            member = f"{msg.level}:{msg.id}"
            batch.tx.hset(self.keys.retry_payloads, member, entry.data)
            batch.tx.zadd(self.keys.retry_due, {member: now + delay})
            batch.tx.hset(self.keys.msg(msg.id), mapping={"status": Status.RETRYING.value, "retry_at": now + delay})
            batch.ack(entry)
            RETRIES.labels(level=msg.level, reason=reason_of(last_error)).inc()

    def _dead(self, batch: Batch, msg: Message, last_error: str, now: float) -> None:
        batch.tx.xadd(
            self.keys.dlq,
            {
                FIELD: msgspec.msgpack.encode(msg),
                b"reason": f"failed {msg.attempts} attempts (max_retries {self.config.queue.retry.max_retries})",
                b"error": last_error,
                b"errors": msgspec.json.encode(msg.errors),
                b"stream": self.keys.retry,
                b"message_id": msg.id,
                b"at": f"{now:.3f}",
            },
        )
        record_outcome(
            batch.tx,
            self.keys,
            Outcome(message=msg, status=Status.DEAD, error=last_error, finished_at=now),
            retention_s=self.retention_s,
            finished=batch.finished,
        )
        DEAD.inc()

    async def move_due(self, now: float | None = None, limit: int = 500) -> int:
        keys = [self.keys.retry_due, self.keys.retry_payloads, *(self.keys.level(n) for n in self.levels)]
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
            except CONNECTION_ERRORS as exc:
                log.warning("retry timer paused, redis unavailable: %s", exc)
                await asyncio.sleep(1.0)
