"""Recording a message's terminal outcome: one place, used by every stage that ends a message.

Queued on the caller's transaction so the outcome commits atomically with the entry's ack: the ``done``
entry (for the archive), the status hash (for clients, with a retention TTL), the release of the
message's in-flight slot, and a notice on the ``finished`` channel for clients waiting on it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio.client import Pipeline

from pipeline.keys import Keys
from pipeline.models import FIELD, Outcome, encode

_json = msgspec.json.Encoder()


def record_outcome(tx: Pipeline, keys: Keys, outcome: Outcome, *, retention_s: float) -> None:
    msg = outcome.message
    fields: dict[Any, Any] = {
        "status": outcome.status.value,
        "attempts": msg.attempts,
        "finished_at": outcome.finished_at,
    }
    if outcome.backend:
        fields["backend"] = outcome.backend
    if outcome.response is not None:
        fields["result"] = _json.encode(outcome.response)
    if outcome.error:
        fields["error"] = outcome.error
    if outcome.started_at:
        fields["started_at"] = outcome.started_at
    tx.xadd(keys.done, {FIELD: encode(outcome)})
    tx.hset(keys.msg(msg.id), mapping=fields)
    tx.expire(keys.msg(msg.id), max(1, int(retention_s)))
    tx.zrem(keys.inflight(msg.level), msg.id)
    tx.publish(keys.finished, msg.id)
