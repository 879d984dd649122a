"""The HTTP API's contract: request and response Structs, and the OpenAPI document built from them.

The handlers decode and encode with these same Structs, so the document cannot drift from what the API
accepts and answers.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
TEXT_MAX = 256
Text = Annotated[str, msgspec.Meta(max_length=TEXT_MAX)]


class SubmitBody(msgspec.Struct, forbid_unknown_fields=True):
    """One message to queue."""

    request: dict[str, Any]
    """An OpenAI chat-completions body (``messages`` required), forwarded to the backend as given."""
    level: Text = "normal"
    session_id: Text | None = None
    """Messages of one session go to the same backend while it is up (session affinity)."""
    tenant: Text | None = None
    idempotency_key: Text | None = None
    """The same key within 24 h returns the first message instead of queueing another."""
    deadline_ms: Annotated[int, msgspec.Meta(gt=0, le=7 * 24 * 3600 * 1000)] | None = None
    """Expire instead of dispatching if not started within this many milliseconds."""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class Accepted(msgspec.Struct, omit_defaults=True):
    id: str
    status: str
    level: str
    position: int | None = None
    """Messages waiting ahead of it in its level when it was queued."""
    eta_s: float | None = None
    """About how long until it leaves the queue, from the level's measured drain rate (absent when the level
    has not been seen draining lately)."""


class ApiError(msgspec.Struct, omit_defaults=True):
    error: str
    field: str | None = None
    status: str | None = None


class BatchItem(msgspec.Struct, omit_defaults=True):
    """The outcome of one item of a batch, in the order given."""

    index: int
    status_code: int
    id: str | None = None
    status: str | None = None
    level: str | None = None
    error: str | None = None
    field: str | None = None


class MessageView(msgspec.Struct):
    id: str
    status: str
    level: str | None = None
    attempts: int = 0
    backend: str | None = None
    enqueued_at: float | None = None
    scheduled_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    retry_at: float | None = None
    first_token_ms: float | None = None
    """A streamed message: its call's time from being sent to the backend's first chunk."""
    position: int | None = None
    """While queued: messages waiting ahead of it in its level."""
    eta_s: float | None = None
    """While queued: about how long until it leaves the queue, from the level's measured drain rate."""
    result: Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={"type": "object"})] | None = None
    """The backend's response body, once completed (passed through as stored)."""
    error: str | None = None
    errors: list[str] | None = None
    """One line per failed attempt, oldest first: its number, backend, time (UTC) and error."""


_lines = msgspec.json.Decoder(list[str])


def error_lines(raw: bytes | str | None) -> list[str] | None:
    """A stored ``errors`` (a JSON list of lines: the status hash's field, the archive's column), or None
    when there is none or it is not that."""
    if not raw:
        return None
    try:
        return _lines.decode(raw)
    except msgspec.DecodeError:
        return None


class Health(msgspec.Struct):
    status: str
    """ok, degraded or down (503)."""
    checks: dict[str, str]


SCHEMA_TYPES = (SubmitBody, Accepted, ApiError, BatchItem, MessageView, Health)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SSE_EVENT = {
    "type": "object",
    "description": "One server-sent event: status, chunk (a chunk of the backend's stream) or end",
    "properties": {
        "event": {"type": "string", "enum": ["status", "chunk", "end"]},
        "data": {
            "type": "string",
            "description": (
                "JSON. status: {status, backend?, position?, eta_s?} (position: messages before it while queued;"
                " eta_s: estimated seconds until it leaves the queue); chunk: the backend's chunk; end: {status,"
                " error?}"
            ),
        },
        "id": {"type": "string", "description": "Resume after it with Last-Event-ID"},
    },
    "required": ["event", "data"],
}


def openapi(*, title: str, version: str, levels: list[str], secured: bool, max_wait_s: float) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(SCHEMA_TYPES, ref_template="#/components/schemas/{name}")
    body = components["SubmitBody"]["properties"]
    body["level"]["enum"] = levels
    body["request"] = {
        "type": "object",
        "description": "An OpenAI chat-completions body, forwarded to the backend as given",
        "required": ["messages"],
        "properties": {"messages": {"type": "array", "minItems": 1, "items": {"type": "object"}}},
        "additionalProperties": True,
    }
    err = _json(_ref("ApiError"), "Error naming what is wrong")
    id_param = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
    security: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}] if secured else []
    paths: dict[str, Any] = {
        "/api/v1/messages": {
            "post": {
                "summary": "Queue one message",
                "requestBody": {"required": True, **_json(_ref("SubmitBody"), "The message")},
                "responses": {
                    "202": _json(_ref("Accepted"), "Queued"),
                    "200": _json(_ref("Accepted"), "Duplicate idempotency key: the first message"),
                    "400": err,
                    "413": err,
                    "415": err,
                    "422": err,
                    "429": err,
                },
            }
        },
        "/api/v1/messages/batch": {
            "post": {
                "summary": "Queue many messages; valid items are accepted even when others are rejected",
                # Items are validated one by one (see SubmitBody) and answered per item, so the array
                # itself constrains nothing beyond being an array.
                "requestBody": {"required": True, **_json({"type": "array", "items": {}}, "SubmitBody items")},
                "responses": {
                    "200": _json({"type": "array", "items": _ref("BatchItem")}, "One result per item, in order"),
                    "400": err,
                    "413": err,
                    "415": err,
                    "422": err,
                },
            }
        },
        "/api/v1/messages/{id}": {
            "get": {
                "summary": "A message's status, and its result or error once finished",
                "parameters": [
                    id_param,
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "description": "Seconds to wait for a terminal status (long poll)",
                        "schema": {"type": "number", "minimum": 0, "maximum": max_wait_s},
                    },
                ],
                "responses": {"200": _json(_ref("MessageView"), "The message"), "404": err, "422": err},
            },
            "delete": {
                "summary": "Cancel a message that has not been dispatched",
                "parameters": [id_param],
                "responses": {"200": _json(_ref("MessageView"), "Cancelled"), "404": err, "409": err},
            },
        },
        "/api/v1/messages/{id}/events": {
            "get": {
                "summary": "The message's life as server-sent events: status, each chunk of a streamed answer, end",
                "parameters": [
                    id_param,
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "description": "Resume after this event id (as the Last-Event-ID header does); empty: none",
                        "schema": {"type": "string", "pattern": "^([0-9]{1,20}-[0-9]{1,20})?$"},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "Resume after this event id; empty: none",
                        "schema": {"type": "string", "pattern": "^([0-9]{1,20}-[0-9]{1,20})?$"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "An event stream",
                        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                    },
                    "404": err,
                    "422": err,
                },
            }
        },
        "/api/v1/health": {
            "get": {
                "summary": "Liveness and component checks",
                "security": [],
                "responses": {"200": _json(_ref("Health"), "ok or degraded"), "503": _json(_ref("Health"), "down")},
            }
        },
        "/api/v1/queues/status": {
            "get": {
                "summary": "Per level: depth, pending, in-flight, consumers, oldest age",
                "responses": {"200": _json({"type": "object"}, "Levels")},
            }
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
    if secured:
        doc["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
        doc["security"] = security
    return doc
