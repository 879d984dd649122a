"""The message every stream carries, its statuses, and the msgpack codec built once for the hot path."""

from __future__ import annotations

import enum
import os
import time
import uuid
from typing import Any

import msgspec


class Status(enum.StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    DISPATCHING = "dispatching"
    COMPLETED = "completed"
    RETRYING = "retrying"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    DEAD = "dead"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.EXPIRED, Status.CANCELLED, Status.DEAD})


class Message(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One LLM request on its way through the pipeline.

    Unknown fields are tolerated (not forbidden) so that a newer stage can add fields while older
    consumers still read the stream during a rolling upgrade.
    """

    id: str
    level: str
    request: dict[str, Any]
    """The OpenAI request body, kept as the client gave it."""
    endpoint: str = "chat/completions"
    """The backend path it goes to (``ENDPOINTS``): chat completions, legacy completions or embeddings."""
    session_id: str | None = None
    tenant: str | None = None
    idempotency_key: str | None = None
    enqueued_at: float
    """Unix time in seconds."""
    deadline: float | None = None
    """Unix time in seconds after which the message expires instead of being dispatched."""
    attempts: int = 0
    """Backend calls made so far."""
    metadata: dict[str, Any] = {}
    errors: list[str] = []
    """One line per failed attempt, oldest first."""
    retry_after: float | None = None
    """Seconds a backend asked to wait (Retry-After) after the last failed attempt."""
    failed_backend: str | None = None
    """The backend of the last failed attempt: the next attempt tries every other usable one first."""
    history: list[str] = []
    """Operator actions on the message (dead-letter replays), oldest first."""
    batch_id: str | None = None
    """The batch (``/v1/batches``) whose input line this message is."""
    custom_id: str | None = None
    """That line's ``custom_id``: the key of its result in the batch's output."""


class Outcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A terminal result, carried by the ``done`` stream to the archive (upserted by message id)."""

    message: Message
    status: Status
    backend: str | None = None
    response: dict[str, Any] | None = None
    """The backend's response body, unchanged."""
    error: str | None = None
    scheduled_at: float | None = None
    started_at: float | None = None
    first_token_ms: float | None = None
    """A streamed call's time from being sent to its first chunk."""
    finished_at: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


ENDPOINTS = ("chat/completions", "completions", "embeddings")
"""The OpenAI API paths a message may go to, under a backend's base URL."""

FIELD = b"m"
"""The single field of every stream entry; its value is the msgpack-encoded payload."""

_encoder = msgspec.msgpack.Encoder()
_message_decoder = msgspec.msgpack.Decoder(Message)
_outcome_decoder = msgspec.msgpack.Decoder(Outcome)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_message(data: bytes) -> Message:
    return _message_decoder.decode(data)


def decode_outcome(data: bytes) -> Outcome:
    return _outcome_decoder.decode(data)


def new_id() -> str:
    """A UUIDv7: 48 bits of Unix milliseconds then random bits, so ids sort by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))
