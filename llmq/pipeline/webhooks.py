"""Webhooks: the events llmq POSTs when a message or a batch ends, and how they are signed.

An event goes to the URL its message or batch names (``metadata.webhook_url``), else to its tenant's
(``tenants[].webhook_url``), and only when that URL falls under one of ``webhooks.endpoints`` (the
allow-list, each entry with its own signing secret). The stage that records the end adds a ``Delivery`` to
the ``webhooks`` stream with its commit (the archive for a message, the batch stage for a batch); the
retry stage's process delivers it (``llmq.stages.webhooks``), with backoff, and dead-letters it after
``webhooks.max_attempts``.

Signatures follow the Standard Webhooks spec: headers ``webhook-id`` (the event's id: the same for every
delivery of one event, so a receiver drops repeats), ``webhook-timestamp`` (Unix seconds) and
``webhook-signature`` (``v1,`` and the base64 HMAC-SHA256 of ``<id>.<timestamp>.<body>`` under the
endpoint's secret, ``whsec_`` and base64). The body: ``{"type": …, "timestamp": …, "data": {…}}``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

from llmq.pipeline.config import Config
from llmq.pipeline.models import Outcome, Status

_IDS = uuid.UUID("5d8f2f0e-6a3c-4f51-9d3e-6c6c6d710002")
MESSAGE_EVENTS = {
    Status.COMPLETED: "message.completed",
    Status.FAILED: "message.failed",
    Status.DEAD: "message.failed",
    Status.EXPIRED: "message.expired",
    Status.CANCELLED: "message.cancelled",
}


class Delivery(msgspec.Struct, kw_only=True, frozen=True):
    """One event on its way to one URL."""

    id: str
    """The event's id (``webhook-id``): the same for every attempt."""
    url: str
    body: bytes
    """The JSON body, signed as it is."""
    attempts: int = 0
    """Deliveries tried so far."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Delivery)
_json = msgspec.json.Encoder()


def encode(d: Delivery) -> bytes:
    return _encoder.encode(d)


def decode(data: bytes) -> Delivery:
    return _decoder.decode(data)


def url_of(config: Config, metadata: dict[str, Any] | None, tenant: str | None) -> str | None:
    """Where the events of a message or batch with ``metadata`` of ``tenant`` go, if anywhere allowed."""
    named = (metadata or {}).get("webhook_url")
    url = named if isinstance(named, str) else None
    if url is None and tenant is not None:
        url = getattr(config.tenant(tenant), "webhook_url", None)  # a listed tenant's (TenantConfig)
    return url if url is not None and config.webhooks.endpoint(url, tenant) is not None else None


def event(kind: str, subject: str, event_type: str, data: dict[str, Any], url: str, *, end: str = "") -> Delivery:
    """The delivery of ``event_type`` about ``subject`` (a message or batch id) to ``url``; ``end`` tells one
    end of the subject from another (a message replayed from the dead letters ends again: a new event, not a
    repeat a receiver would drop)."""
    event_id = "evt_" + uuid.uuid5(_IDS, f"{kind}:{subject}:{event_type}:{url}:{end}").hex
    at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return Delivery(id=event_id, url=url, body=_json.encode({"type": event_type, "timestamp": at, "data": data}))


def message_event(outcome: Outcome, url: str) -> Delivery:
    msg = outcome.message
    data: dict[str, Any] = {
        "id": msg.id,
        "status": outcome.status.value,
        "level": msg.level,
        "tenant": msg.tenant,
        "attempts": msg.attempts,
        "backend": outcome.backend,
        "error": outcome.error,
        "finished_at": outcome.finished_at,
    }
    return event("message", msg.id, MESSAGE_EVENTS[outcome.status], data, url, end=repr(outcome.finished_at))


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of a delivery (ValueError for a secret that is not base64)."""
    key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(secret: str, d: Delivery, now: float | None = None) -> dict[str, str]:
    timestamp = int(now if now is not None else time.time())
    return {
        "content-type": "application/json",
        "webhook-id": d.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, d.id, timestamp, d.body),
    }
