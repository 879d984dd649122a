"""How the ingest API reads requests and answers them: JSON bodies within a size limit, errors that name
the field (llmq's shape and OpenAI's), API keys compared in constant time, and counters per route
template. Route handlers raise ``BadInput``; ``handled`` turns it into the 4xx it describes."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from llmq.pipeline.config import Config
from llmq.pipeline.models import Message, encode
from llmq.pipeline.redis import UNAVAILABLE
from llmq.stages.ingest import schema
from llmq.stages.ingest.keyring import KeyRing

T = TypeVar("T")

HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests", ["method", "path", "status"])
HTTP_DURATION = Histogram("http_request_duration_seconds", "HTTP request duration", ["method", "path"])
INGESTED = Counter("llmq_messages_ingested_total", "Messages accepted into a level stream", ["level"])
REJECTED = Counter("llmq_rejected_total", "Requests rejected, by reason", ["reason"])

PUBLIC_PATHS = frozenset(
    {"/api/v1/health", "/api/v1/metrics", "/openapi.json", "/docs", "/", "/ui/app.js", "/ui/app.css"}
)
"""Served without an API key, with the configured ``metrics.path`` (Prometheus scrapes without one). The
dashboard's page and assets hold no data: the page asks for a key and sends it with every call it makes."""
REASONS = {
    400: "malformed",
    401: "auth",
    403: "tenant",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    415: "media_type",
    422: "invalid",
    429: "backpressure",
    503: "unavailable",
    504: "timeout",
}
_json = msgspec.json.Encoder()


def respond(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(doc), status_code=status, media_type="application/json", headers=headers)


def reject(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> Response:
    REJECTED.labels(reason=REASONS.get(status, str(status))).inc()
    return respond(schema.ApiError(error=message, field=field), status, headers)


def openai_error(
    status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"
) -> Response:
    REJECTED.labels(reason=REASONS.get(status, str(status))).inc()
    return respond({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def _openai_reject(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    response = openai_error(status, message, param=field, kind=_OPENAI_KINDS.get(status, "invalid_request_error"))
    response.headers.update(headers or {})
    return response


_OPENAI_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 503: "api_error"}


NOT_STORABLE = "the request holds a value PostgreSQL cannot store (a NUL character, say)"
"""A 400 for what PostgreSQL refuses as data, never a 503 that a client would retry for ever."""


class ArchiveUnavailable(Exception):
    """PostgreSQL could not be asked (a message whose Redis status has expired): 503, not "no such message"."""


class BadInput(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def field_of(exc: msgspec.ValidationError) -> tuple[str, str | None]:
    text = str(exc)
    if " - at `$" in text:
        message, _, where = text.rpartition(" - at `$")
        return message, where.rstrip("`").lstrip(".") or None
    return text, None


def caller_of(key: bytes) -> str:
    """Who a caller is, for scoping what is theirs (idempotency keys): a digest of their API key, which is
    never stored itself."""
    return hashlib.sha256(b"llmq-caller\0" + key).hexdigest()[:16]


def caller(request: Request) -> str:
    """The caller of an authenticated request ("" when the API has no keys)."""
    return str(request.scope.get("state", {}).get("caller", ""))


def tenant_of(request: Request, claimed: str | None, field: str) -> str | None:
    """The tenant a request is: its API key's, when the key is a tenant's (BadInput 403 when it claims another
    one in ``field``); otherwise the one it names, if any (no keys, or a key of no tenant)."""
    owner = request.scope.get("state", {}).get("tenant")
    if owner is None:
        return claimed
    if claimed is not None and claimed != owner:
        raise BadInput(403, f"this API key is tenant {owner!r}'s; it cannot submit as {claimed!r}", field)
    return str(owner)


def check_webhook_url(config: Config, metadata: dict[str, Any] | None, tenant: str | None, field: str) -> None:
    """BadInput 422 when ``metadata.webhook_url`` is given and falls under no ``webhooks.endpoints`` open to
    ``tenant``: llmq sends no request to an address the operator has not allowed. The endpoints are not named
    (they may be other tenants' receivers)."""
    url = (metadata or {}).get("webhook_url")
    if url is None:
        return
    if not isinstance(url, str) or config.webhooks.endpoint(url, tenant) is None:
        raise BadInput(422, "webhook_url is under none of the webhook endpoints allowed (webhooks.endpoints)", field)


def operator_only(request: Request) -> None:
    """BadInput 403 for a tenant's key: what every tenant's messages show (the dashboard, the dead letters) is
    read and acted on with an operator's key (one of no tenant), or with none where no keys are configured."""
    owner = request.scope.get("state", {}).get("tenant")
    if owner is not None:
        raise BadInput(403, f"this API key is tenant {owner!r}'s; this needs an operator's key (one of no tenant)")


class ApiKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>`` or ``X-API-Key`` matches a configured key (constant-time
    comparison against every key; keys are never logged). The request's ``caller`` is set from the key, and
    its ``tenant`` when the key is a tenant's."""

    def __init__(self, app: ASGIApp, ring: KeyRing, metrics_path: str) -> None:
        self.app = app
        self.ring = ring
        self.public = PUBLIC_PATHS | {metrics_path}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.ring.secured or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        ok, tenant = False, None
        for key, owner in self.ring.keys:  # every key compared, whichever matches: the time tells nothing
            if hmac.compare_digest(given, key):
                ok, tenant = True, owner
        if not ok:
            await reject(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})(
                scope, receive, send
            )
            return
        state = scope.setdefault("state", {})
        state["caller"] = caller_of(given)
        state["tenant"] = tenant
        await self.app(scope, receive, send)


async def read_body(request: Request, *, limit: int) -> bytes:
    """The JSON body, read up to ``limit`` bytes; BadInput (415, 413) otherwise."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise BadInput(415, "content type must be application/json")
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """``body`` decoded; BadInput 400 when it is not JSON (or nests too deeply), 422 naming the field when
    it does not match the decoder's type."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, field = field_of(exc)
        raise BadInput(422, message, field) from None
    except msgspec.DecodeError as exc:
        raise BadInput(400, f"malformed JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise BadInput(400, f"malformed JSON: invalid UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise BadInput(400, "malformed JSON: nested too deeply") from None


def encode_message(msg: Message, where: str = "") -> bytes:
    """The stored form of ``msg``; BadInput 422 naming the field when a value cannot be stored."""
    try:
        return encode(msg)
    except RecursionError:
        raise BadInput(422, "a value cannot be stored: nested too deeply", f"{where}request") from None
    except (OverflowError, msgspec.EncodeError) as exc:
        raise BadInput(
            422, f"a value cannot be stored: {exc} (integers must fit in 64 bits)", f"{where}request"
        ) from None


def idempotency_conflict(first_id: str | None) -> str:
    return f"idempotency key first used with a different request (message {first_id}); a new request needs a new key"


def handled(path: str, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Bad input becomes a 4xx naming the field, a Redis outage a 503; requests are counted and timed by
    route template (never the raw path, which holds ids)."""

    # OpenAI's paths answer errors in OpenAI's shape, so its SDK raises its own exceptions
    fail = _openai_reject if path.startswith("/v1/") else reject

    async def wrapped(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except BadInput as exc:
            response = fail(exc.status, exc.message, exc.field)
        except UNAVAILABLE:
            response = fail(503, "queue storage unavailable; retry later", headers={"Retry-After": "1"})
        except ArchiveUnavailable:
            response = fail(503, "the archive is unavailable; retry later", headers={"Retry-After": "5"})
        HTTP_REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        HTTP_DURATION.labels(request.method, path).observe(time.perf_counter() - started)
        return response

    return wrapped


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    HTTP_REQUESTS.labels(request.method, "<unmatched>", str(exc.status_code)).inc()
    return respond(schema.ApiError(error=str(exc.detail)), exc.status_code, dict(exc.headers or {}))


async def server_error(request: Request, exc: Exception) -> Response:
    HTTP_REQUESTS.labels(request.method, "<error>", "500").inc()
    return respond(schema.ApiError(error="internal error; see the server log"), 500)
