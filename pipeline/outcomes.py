"""Recording a message's terminal outcome: one place, used by every stage that ends a message.

Queued on the caller's transaction so the outcome commits atomically with the entry's ack: the ``done``
entry (for the archive), the status hash (for clients, with a retention TTL) and the release of the
message's in-flight slot. The message's id joins the caller's ``finished`` list, which the transaction
announces in one notice on the ``finished`` channel (``announce``): one PUBLISH per commit, not per
message, wakes the scheduler and every ingest process once for a whole batch of outcomes.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio.client import Pipeline

from pipeline.keys import Keys
from pipeline.models import FIELD, Outcome, encode

_json = msgspec.json.Encoder()


# KEYS: done stream, status hash, in-flight set. ARGV: payload field, payload, retention seconds, message id,
# then the status hash's field/value pairs.
_RECORD = """
redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[4])
"""


def record_outcome(tx: Pipeline, keys: Keys, outcome: Outcome, *, retention_s: float, finished: list[str]) -> None:
    """One EVAL rather than four commands: redis-py spends about 10 µs of the stage's CPU per command of a
    transaction (queueing, packing, a QUEUED reply and a result to parse). EVAL, not EVALSHA: inside
    MULTI a NOSCRIPT error could not be recovered, and the ack beside it would commit without it.
    Appends the message's id to ``finished``, for the transaction's ``announce``."""
    msg = outcome.message
    fields: list[Any] = ["status", outcome.status.value, "attempts", msg.attempts, "finished_at", outcome.finished_at]
    if outcome.backend:
        fields += ["backend", outcome.backend]
    if outcome.response is not None:
        fields += ["result", _json.encode(outcome.response)]
    if outcome.error:
        fields += ["error", outcome.error]
    if outcome.started_at:
        fields += ["started_at", outcome.started_at]
    key = keys.msg(msg.id)
    args = [FIELD, encode(outcome), max(1, int(retention_s)), msg.id, *fields]
    tx.eval(_RECORD, 3, keys.done, key, keys.inflight(msg.level), *args)
    finished.append(msg.id)


def announce(tx: Pipeline, keys: Keys, finished: list[str]) -> None:
    """Queue the notice that the messages ``finished`` reached a terminal status: their ids, separated by
    spaces, on the ``finished`` channel (``pipeline.notify`` splits them)."""
    if finished:
        tx.publish(keys.finished, " ".join(finished))
