"""A message's terminal outcome as the effect that records it: one place, used by every stage that ends a
message.

Committed with the entry's ack (``llmq.pipeline.runtime.effects``): the ``done`` entry (for the archive), the status
hash (for clients, with a retention TTL) and the release of the message's in-flight slot. The commit
announces the ids of every message it finished in one notice on the ``finished`` channel: one PUBLISH per
commit, not per message, wakes the scheduler and every ingest process once for a whole batch of outcomes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from llmq.pipeline.keys import Keys
from llmq.pipeline.models import Outcome, Status, encode
from llmq.pipeline.runtime import effects

_json = msgspec.json.Encoder()


def outcome_effect(keys: Keys, outcome: Outcome, *, retention_s: float, cancellable: bool = False) -> effects.Effect:
    """The effect that records ``outcome``; its status hash is kept ``retention_s`` (at least 1 s). An end
    that a client's cancel may have overtaken (the message was queued, waiting or retrying) is
    ``cancellable``: a cancel acknowledged meanwhile wins, and the archive gets a cancelled outcome."""
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
    cancelled = b""
    if cancellable and outcome.status is not Status.CANCELLED:
        cancelled = encode(Outcome(message=msg, status=Status.CANCELLED, finished_at=outcome.finished_at))
    return effects.finish(
        done=keys.done,
        hash_key=keys.msg(msg.id),
        inflight=keys.inflight(msg.level),
        message_id=msg.id,
        retention_s=max(1, int(retention_s)),
        payload=encode(outcome),
        cancelled=cancelled,
        fields=fields,
    )
