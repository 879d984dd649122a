"""ingest: the HTTP API through which requests enter the queue (Starlette on uvicorn).

Each accepted message is XADDed to its level stream and its status hash written in one MULTI/EXEC, so a
message is either fully queued or not at all. uvicorn owns signals here; the Redis client is injected.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.config import Config
from pipeline.keys import Keys
from pipeline.models import FIELD, Message, Status, encode, new_id
from pipeline.queues import level_status
from pipeline.redis import CONNECTION_ERRORS

HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests", ["method", "path", "status"])
HTTP_DURATION = Histogram("http_request_duration_seconds", "HTTP request duration", ["method", "path"])
INGESTED = Counter("llmq_messages_ingested_total", "Messages accepted into a level stream", ["level"])
REJECTED = Counter("llmq_rejected_total", "Requests rejected, by reason", ["reason"])

PUBLIC_PATHS = frozenset({"/api/v1/health", "/metrics", "/api/v1/metrics"})


class SubmitBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/v1/messages``."""

    request: dict[str, Any]
    """An OpenAI chat-completions body, kept as given."""
    level: str = "normal"
    session_id: str | None = msgspec.field(default=None)
    tenant: str | None = None
    idempotency_key: str | None = None
    deadline_ms: int | None = msgspec.field(default=None)
    """Milliseconds from now after which the message expires instead of being dispatched."""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


_submit_decoder = msgspec.json.Decoder(SubmitBody)
_json = msgspec.json.Encoder()


def _json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(doc), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, field: str | None = None) -> Response:
    doc: dict[str, Any] = {"error": message}
    if field:
        doc["field"] = field
    REJECTED.labels(reason=str(status)).inc()
    return _json_response(doc, status)


class ApiKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>`` or ``X-API-Key`` matches a configured key
    (constant-time comparison; keys are never logged)."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth.lower().startswith(b"bearer "):
            given = auth[7:].strip()
        # Compare against every key so the time taken does not tell which key nearly matched.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            response = _error(401, "missing or invalid API key")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _metered(path: str, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Counts and times requests by route template (never the raw path, which holds ids)."""

    async def wrapped(request: Request) -> Response:
        started = time.perf_counter()
        response = await handler(request)
        HTTP_REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        HTTP_DURATION.labels(request.method, path).observe(time.perf_counter() - started)
        return response

    return wrapped


def create_app(config: Config, *, redis: aioredis.Redis, keys: Keys) -> Starlette:
    levels = {lv.name: lv for lv in config.queue.levels}
    max_body = config.server.max_body_bytes
    msg_ttl_s = 7 * 24 * 3600

    async def submit(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "content type must be application/json")
        body = await request.body()
        if len(body) > max_body:
            return _error(413, f"body is {len(body)} bytes; the limit is {max_body}")
        try:
            sub = _submit_decoder.decode(body)
        except msgspec.ValidationError as exc:
            text = str(exc)
            field = text.rsplit(" - at `$.", 1)[1].rstrip("`") if " - at `$." in text else None
            return _error(422, text.split(" - at ")[0], field)
        except msgspec.DecodeError as exc:
            return _error(400, f"malformed JSON: {exc}")
        if sub.level not in levels:
            return _error(422, f"unknown level {sub.level!r}; valid levels: {', '.join(levels)}", "level")
        if not isinstance(sub.request.get("messages"), list):
            return _error(422, "request.messages must be a list of chat messages", "request.messages")
        if sub.deadline_ms is not None and sub.deadline_ms <= 0:
            return _error(422, "deadline_ms must be a positive number of milliseconds", "deadline_ms")
        now = time.time()
        msg = Message(
            id=new_id(),
            level=sub.level,
            request=sub.request,
            session_id=sub.session_id,
            tenant=sub.tenant,
            idempotency_key=sub.idempotency_key,
            enqueued_at=now,
            deadline=None if sub.deadline_ms is None else now + sub.deadline_ms / 1000,
            metadata=sub.metadata,
        )
        tx = redis.pipeline(transaction=True)
        tx.xadd(keys.level(msg.level), {FIELD: encode(msg)})
        tx.hset(
            keys.msg(msg.id),
            mapping={"status": Status.QUEUED.value, "level": msg.level, "attempts": 0, "enqueued_at": now},
        )
        tx.expire(keys.msg(msg.id), msg_ttl_s)
        try:
            await tx.execute()
        except CONNECTION_ERRORS:
            return _error(503, "queue storage unavailable; retry later")
        INGESTED.labels(level=msg.level).inc()
        return _json_response({"id": msg.id, "status": Status.QUEUED.value, "level": msg.level}, 202)

    async def get_message(request: Request) -> Response:
        message_id = request.path_params["id"]
        if len(message_id) > 64 or not all(c.isalnum() or c == "-" for c in message_id):
            return _error(404, "no such message")
        try:
            fields: Any = await redis.hgetall(keys.msg(message_id))
        except CONNECTION_ERRORS:
            return _error(503, "queue storage unavailable; retry later")
        if not fields:
            return _error(404, "no such message")
        doc: dict[str, Any] = {"id": message_id}
        for k, v in fields.items():
            doc[k.decode()] = v.decode(errors="replace")
        doc["attempts"] = int(doc.get("attempts", 0))
        return _json_response(doc)

    async def health(_: Request) -> Response:
        try:
            await redis.ping()
            return _json_response({"status": "ok", "checks": {"redis": "ok"}})
        except CONNECTION_ERRORS:
            return _json_response({"status": "down", "checks": {"redis": "down"}}, 503)

    async def queues_status(_: Request) -> Response:
        try:
            statuses = await level_status(redis, keys, config)
        except CONNECTION_ERRORS:
            return _error(503, "queue storage unavailable; retry later")
        return _json_response({"levels": statuses})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        ("/api/v1/messages", submit, ["POST"]),
        ("/api/v1/messages/{id}", get_message, ["GET"]),
        ("/api/v1/health", health, ["GET"]),
        ("/api/v1/queues/status", queues_status, ["GET"]),
        (config.metrics.path, metrics, ["GET"]),
        ("/api/v1/metrics", metrics, ["GET"]),
    ]
    return Starlette(
        routes=[Route(path, _metered(path, fn), methods=methods) for path, fn, methods in routes],
        middleware=[Middleware(ApiKeyMiddleware, keys=list(config.api_keys))],
    )
