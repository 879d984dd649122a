"""What settling a stream entry changes in Redis, committed with the entry's XACK in one script.

A stage decides per entry and names the effects of its decision (``Effect``: a hand-off to the next
stream, a status, an outcome, a dead letter…). ``Commit`` sends a batch's decisions as one call of
``scripts/commit.lua``, which acks each entry and runs its effects only if that XACK acked it. Every
commit is therefore safe to repeat: after a lost reply (redis-py resends the call on a new connection), or
when another consumer took the entry over and settled it first, nothing happens twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from llmq.pipeline import metrics
from llmq.pipeline.lua import Lua
from llmq.pipeline.models import FIELD

log = logging.getLogger("llmq.commit")


@dataclass(frozen=True, slots=True)
class Effect:
    """One operation of ``scripts/commit.lua``: its name, the keys it touches and its arguments."""

    name: str
    keys: tuple[str, ...]
    args: tuple[Any, ...] = ()


def xadd(stream: str, payload: bytes) -> Effect:
    """Append a payload to a stream (a hand-off)."""
    return Effect("xadd", (stream,), (FIELD, payload))


def hset(key: str, fields: dict[str, Any]) -> Effect:
    return Effect("hset", (key,), _pairs(fields))


def rpush(key: str, value: Any) -> Effect:
    return Effect("rpush", (key,), (value,))


def zadd(key: str, member: str, score: float) -> Effect:
    return Effect("zadd", (key,), (score, member))


def zrem(key: str, member: str) -> Effect:
    return Effect("zrem", (key,), (member,))


def incrby(key: str, amount: int, *, ttl_s: int) -> Effect:
    return Effect("incrby", (key,), (amount, ttl_s))


def publish(channel: str, message: str) -> Effect:
    return Effect("publish", (), (channel, message))


def retrying(key: str, **fields: Any) -> Effect:
    """A message waits for another attempt (status ``retrying`` and ``fields``) unless it has ended already: a
    message cancelled meanwhile stays cancelled."""
    return Effect("retrying", (key,), _pairs(fields))


def release(inflight: str, message_id: str) -> Effect:
    """A message's slot in its level's in-flight set is free."""
    return Effect("release", (inflight,), (message_id,))


def finish(
    *,
    done: str,
    hash_key: str,
    inflight: str,
    message_id: str,
    retention_s: int,
    payload: bytes,
    cancelled: bytes,
    fields: Sequence[Any],
    events: str | None = None,
    end_event: bytes = b"",
) -> Effect:
    """A terminal outcome: to the done stream, into the status hash (with the retention TTL), out of the
    in-flight set, and its id announced on the finished channel once the commit ends. When the message was
    cancelled meanwhile, ``cancelled`` (an outcome saying so; empty when no cancel can race this end) goes
    to the done stream instead and the status stays cancelled. A streamed message's ``events`` stream gets
    ``end_event`` (or a cancelled one) and the retention TTL."""
    keys = (done, hash_key, inflight) if events is None else (done, hash_key, inflight, events)
    return Effect("finish", keys, (message_id, retention_s, payload, cancelled, end_event, *fields))


def deadletter(stream: str, index: str, message_id: str | None, fields: dict[Any, Any]) -> Effect:
    """An entry of the dead-letter stream, indexed by its message's id (when it has one)."""
    return Effect("deadletter", (stream, index), (message_id or "", *_pairs(fields)))


def shorten(key: str, ttl_s: int, events: str | None = None) -> Effect:
    """Shorten a message's status hash (and its ``events`` stream, when streamed) to ``ttl_s``: never
    lengthen it, and give no TTL to one that has none (a message a replay made live again has none)."""
    return Effect("shorten", (key,) if events is None else (key, events), (ttl_s,))


def _pairs(fields: dict[Any, Any]) -> tuple[Any, ...]:
    return tuple(x for pair in fields.items() for x in pair)


Record = tuple[str, Sequence[Effect]]
"""An entry id ("" for none) and the effects that run when it is acked (always, for none)."""


class Commit:
    """Sends records of one stream and group as one call of ``scripts/commit.lua``."""

    def __init__(self, redis: aioredis.Redis, *, stream: str, group: str, channel: str, dlq: str) -> None:
        self.stream = stream
        self.group = group
        self.channel = channel
        self.dlq = dlq
        self._script = Lua(redis, "commit")

    async def __call__(self, records: Sequence[Record]) -> list[bool]:
        """Run the records; per record with an entry id, whether this call acked it (and ran its effects, or
        dead-lettered it when one failed)."""
        keys: dict[str, int] = {self.stream: 1, self.dlq: 2}
        args: list[Any] = [self.group, self.channel]
        for entry_id, effects in records:
            args += [entry_id, len(effects)]
            for e in effects:
                args += [e.name, len(e.keys)]
                args += [keys.setdefault(k, len(keys) + 1) for k in e.keys]
                args += [len(e.args), *e.args]
        flags = await self._script(list(keys), args)
        if failed := flags.count(2):
            metrics.POISON.labels(stage=self.group).inc(failed)
            log.error(
                "an effect failed in a commit of %s: %d entries dead-lettered with the error", self.stream, failed
            )
        return [bool(f) for f in flags]
