"""A message's status hash (``keys.msg(id)``): how its status changes, in one place.

In Lua, every change is a function of ``scripts/status.lua``, included by each script that makes it: queued
(submit), scheduled (admit), dispatching (begin), requeued (move_due), cancelled (cancel), replayed
(dlq_replay), and the commit effects below. Here, the effects a stage commits with an entry's ack
(``llmq.pipeline.runtime.effects``):

- ``ended``: a terminal outcome: the ``done`` entry (for the archive), the status hash (for clients, with a
  retention TTL) and the release of the message's in-flight slot. The commit announces the ids of every
  message it finished in one notice on the ``finished`` channel: one PUBLISH per commit, not per message,
  wakes the scheduler and every ingest process once for a whole batch of outcomes.
- ``retrying``: waiting for another attempt, unless a cancel ended it meanwhile.
- ``shortened``: archived, so Redis keeps it only for a short window.
"""

from __future__ import annotations

from typing import Any

import msgspec

from llmq.pipeline.keys import Keys
from llmq.pipeline.models import Message, Outcome, Status, encode
from llmq.pipeline.runtime import effects
from llmq.pipeline.streamed import end_event, is_streamed

_json = msgspec.json.Encoder()

UNENDED_TTL_S = 7 * 24 * 3600
"""A message's status hash lives this long at most before it ends (ending sets ``queue.result_retention``);
what counts a tenant's unended messages forgets one older than this."""


def ended(keys: Keys, outcome: Outcome, *, retention_s: float, cancellable: bool = False) -> effects.Effect:
    """The effect that records ``outcome``; its status hash is kept ``retention_s`` (at least 1 s). An end
    that a client's cancel may have overtaken (the message was queued, waiting or retrying) is
    ``cancellable``: a cancel acknowledged meanwhile wins, and the archive gets a cancelled outcome."""
    msg = outcome.message
    streamed = is_streamed(msg)
    fields: list[Any] = ["status", outcome.status.value, "attempts", msg.attempts, "finished_at", outcome.finished_at]
    if outcome.backend:
        fields += ["backend", outcome.backend]
    if outcome.response is not None:
        fields += ["result", _json.encode(outcome.response)]
    if outcome.error:
        fields += ["error", outcome.error]
    if msg.errors:
        fields += ["errors", _json.encode(msg.errors)]
    if outcome.first_token_ms is not None:
        fields += ["first_token_ms", outcome.first_token_ms]
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
        events=keys.events(msg.id) if streamed else None,
        end_event=end_event(outcome) if streamed else b"",
    )


def retrying(keys: Keys, message_id: str, **fields: Any) -> effects.Effect:
    """The message waits for another attempt (with ``fields``: attempts, error, retry_at)."""
    return effects.retrying(keys.msg(message_id), **fields)


def shortened(keys: Keys, msg: Message, ttl_s: float) -> effects.Effect:
    """The message is archived: its status hash (and events stream) are kept ``ttl_s`` more at most."""
    events = keys.events(msg.id) if is_streamed(msg) else None
    return effects.shorten(keys.msg(msg.id), max(1, int(ttl_s)), events)
