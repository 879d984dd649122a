"""ingest: the HTTP API through which requests enter the queue (Starlette on uvicorn).

Submissions go through ``llmq.stages.ingest.submit`` (backpressure, idempotency, XADD and status hash in one atomic
script). Status reads long-poll on the ``finished`` channel, and fall back to the PostgreSQL archive once
the status hash has expired. The OpenAI-compatible routes are in ``llmq.stages.ingest.openai_facade``; how
requests are read and answered (bodies, errors naming the field, API keys, per-route counters) in
``llmq.stages.ingest.http_api``. uvicorn owns signals here; clients are injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import psycopg
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from llmq.pipeline.config import Config
from llmq.pipeline.dlq import DeadLetters
from llmq.pipeline.keys import Keys
from llmq.pipeline.level_status import level_status
from llmq.pipeline.models import Message, Status, new_id
from llmq.pipeline.notify import Waiter
from llmq.pipeline.redis import CONNECTION_ERRORS, UNAVAILABLE
from llmq.stages.ingest import schema
from llmq.stages.ingest.http_api import (
    INGESTED,
    REJECTED,
    ApiKeyMiddleware,
    ArchiveUnavailable,
    BadInput,
    caller,
    decode_json,
    encode_message,
    field_of,
    handled,
    http_error,
    idempotency_conflict,
    read_body,
    reject,
    respond,
    server_error,
)
from llmq.stages.ingest.openai_facade import OpenAIFacade
from llmq.stages.ingest.submit import Submission, Submitted, Submitter, Verdict, new_message, request_digest

log = logging.getLogger("llmq.ingest")

QUEUE_DEPTH = Gauge("queue_depth", "Messages waiting for admission in a level (lag + pending)", ["level"])

DEPTH_EVERY_S = 5.0
_submit_decoder = msgspec.json.Decoder(schema.SubmitBody)
_any_decoder = msgspec.json.Decoder()


class IngestApi:
    def __init__(
        self, config: Config, *, redis: aioredis.Redis, keys: Keys, pool: AsyncConnectionPool | None = None
    ) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.levels = [lv.name for lv in config.queue.levels]
        self.submitter = Submitter(config, redis=redis, keys=keys)
        self.waiter = Waiter(redis=redis, keys=keys)
        self.dead = DeadLetters(redis=redis, keys=keys, levels=self.levels)
        self.max_body = config.server.max_body_bytes

    # --- input ---------------------------------------------------------------------------------------

    def _message(self, sub: schema.SubmitBody, request: Request, where: str = "") -> Submission:
        """The message to submit; BadInput naming the field when it cannot be queued."""
        if sub.level not in self.levels:
            raise BadInput(422, f"unknown level {sub.level!r}; valid levels: {', '.join(self.levels)}", f"{where}level")
        messages = sub.request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadInput(
                422, "request.messages must be a non-empty list of chat messages", f"{where}request.messages"
            )
        for i, item in enumerate(messages):
            if not isinstance(item, dict):
                raise BadInput(422, "each chat message must be an object", f"{where}request.messages[{i}]")
        if sub.request.get("stream"):
            raise BadInput(
                422, "stream=true is not supported: the result is the whole completion", f"{where}request.stream"
            )
        msg = new_message(
            message_id=new_id(),
            level=sub.level,
            request=sub.request,
            session_id=sub.session_id,
            tenant=sub.tenant,
            idempotency_key=sub.idempotency_key,
            deadline_ms=sub.deadline_ms,
            metadata=sub.metadata,
        )
        try:
            digest = request_digest(sub) if sub.idempotency_key else ""
        except ValueError as exc:
            raise BadInput(422, f"the request is {exc}", f"{where}request") from None
        return Submission(msg, encode_message(msg, where), caller=caller(request), digest=digest)

    # --- messages ------------------------------------------------------------------------------------

    def _accepted(self, msg: Message, result: Submitted) -> tuple[int, schema.Accepted]:
        if result.verdict is Verdict.DUPLICATE:
            return 200, schema.Accepted(id=result.message_id or "", status="duplicate", level=msg.level)
        INGESTED.labels(level=msg.level).inc()
        return 202, schema.Accepted(id=msg.id, status=Status.QUEUED.value, level=msg.level, position=result.depth)

    async def submit(self, request: Request) -> Response:
        body = await read_body(request, limit=self.max_body)
        submission = self._message(decode_json(_submit_decoder, body), request)
        msg = submission.message
        result = await self.submitter.submit(submission)
        if result.verdict is Verdict.CONFLICT:
            raise BadInput(422, idempotency_conflict(result.message_id), "idempotency_key")
        if result.verdict is Verdict.FULL:
            return reject(429, f"level {msg.level!r} is full ({result.depth} waiting)", headers={"Retry-After": "1"})
        if result.verdict is Verdict.DUPLICATE:
            try:
                existing = await self.view(result.message_id or "")
            except ArchiveUnavailable:  # its status is only in PostgreSQL, which cannot be asked now
                existing = None
            doc = schema.Accepted(
                id=result.message_id or "", status=existing.status if existing else "queued", level=msg.level
            )
            return respond(doc, 200)
        code, doc = self._accepted(msg, result)
        return respond(doc, code)

    async def submit_batch(self, request: Request) -> Response:
        body = await read_body(request, limit=self.max_body * 4)
        items = decode_json(_any_decoder, body)
        if not isinstance(items, list):
            raise BadInput(422, "the body must be a JSON array of messages")
        if len(items) > self.config.server.max_batch:
            raise BadInput(413, f"{len(items)} messages; a batch holds at most {self.config.server.max_batch}")
        results: list[schema.BatchItem | None] = [None] * len(items)
        valid: list[tuple[int, Submission]] = []
        for i, item in enumerate(items):
            try:
                sub = msgspec.convert(item, schema.SubmitBody)
                valid.append((i, self._message(sub, request, f"[{i}].")))
            except msgspec.ValidationError as exc:
                message, field = field_of(exc)
                results[i] = schema.BatchItem(
                    index=i, status_code=422, error=message, field=f"[{i}].{field}" if field else f"[{i}]"
                )
            except BadInput as exc:
                results[i] = schema.BatchItem(index=i, status_code=exc.status, error=exc.message, field=exc.field)
        outcomes = await self.submitter.submit_many([item for _, item in valid])
        for (i, submission), result in zip(valid, outcomes, strict=True):
            msg = submission.message
            if result.verdict is Verdict.CONFLICT:
                REJECTED.labels(reason="invalid").inc()
                error = idempotency_conflict(result.message_id)
                results[i] = schema.BatchItem(index=i, status_code=422, error=error, field=f"[{i}].idempotency_key")
                continue
            if result.verdict is Verdict.FULL:
                REJECTED.labels(reason="backpressure").inc()
                results[i] = schema.BatchItem(
                    index=i, status_code=429, error=f"level {msg.level!r} is full", level=msg.level
                )
                continue
            code, doc = self._accepted(msg, result)
            results[i] = schema.BatchItem(index=i, status_code=code, id=doc.id, status=doc.status, level=msg.level)
        return respond(results)

    async def view(self, message_id: str) -> schema.MessageView | None:
        fields: Any = await self.redis.hgetall(self.keys.msg(message_id))
        if fields:
            raw_result = fields.pop(b"result", None)
            doc = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            # The stored JSON as it is: decoding it could fail on an answer nested deeper than this stack
            result = msgspec.Raw(raw_result) if raw_result is not None else None
            floats = ("enqueued_at", "scheduled_at", "started_at", "finished_at", "retry_at")
            return schema.MessageView(
                id=message_id,
                status=doc.get("status", "unknown"),
                level=doc.get("level"),
                attempts=int(doc.get("attempts", 0)),
                backend=doc.get("backend"),
                result=result,
                error=doc.get("error") or None,
                **{f: float(doc[f]) for f in floats if doc.get(f)},
            )
        return await self._archived(message_id)

    async def _archived(self, message_id: str) -> schema.MessageView | None:
        try:
            key = uuid.UUID(message_id)  # the primary key's type: compared as text, no index would serve
        except ValueError:
            return None
        if self.pool is None:
            return None
        try:
            async with self.pool.connection(timeout=2) as conn:
                cur = await conn.execute(
                    "SELECT status, level, attempts, backend, extract(epoch FROM enqueued_at),"
                    " extract(epoch FROM started_at), extract(epoch FROM finished_at), response::text, error"
                    " FROM messages WHERE id = %s",
                    (key,),
                )
                row = await cur.fetchone()
        except (psycopg.Error, OSError, TimeoutError):
            raise ArchiveUnavailable from None
        if row is None:
            return None
        status, level, attempts, backend, enq, started, finished, response, error = row
        return schema.MessageView(
            id=message_id,
            status=status,
            level=level,
            attempts=attempts,
            backend=backend,
            enqueued_at=float(enq),
            started_at=float(started) if started else None,
            finished_at=float(finished),
            result=msgspec.Raw(response.encode()) if response is not None else None,
            error=error,
        )

    async def get_message(self, request: Request) -> Response:
        message_id = request.path_params["id"]
        wait = request.query_params.get("wait")
        wait_s = 0.0
        if wait is not None:
            try:
                wait_s = float(wait)
            except ValueError:
                raise BadInput(422, f"wait must be a number of seconds, got {wait!r}", "wait") from None
            max_wait = self.config.server.max_poll_wait.seconds
            if not 0 <= wait_s <= max_wait:
                raise BadInput(422, f"wait must be between 0 and {max_wait:g} seconds", "wait")
        if not _valid_id(message_id):
            raise BadInput(404, "no such message")
        view = await self.view(message_id)
        if view is None:
            raise BadInput(404, "no such message")
        if wait_s and not Status(view.status).terminal:
            await self.waiter.wait(message_id, lambda: self.terminal(message_id), wait_s)
            view = await self.view(message_id) or view
        return respond(view)

    async def terminal(self, message_id: str) -> bool:
        raw: Any = await self.redis.hget(self.keys.msg(message_id), "status")
        return raw is None or Status(raw.decode()).terminal

    async def message(self, request: Request) -> Response:
        """One route for both methods, so a 405 lists every allowed method."""
        return await (self.cancel(request) if request.method == "DELETE" else self.get_message(request))

    async def cancel(self, request: Request) -> Response:
        message_id = request.path_params["id"]
        if not _valid_id(message_id):
            raise BadInput(404, "no such message")
        status = await self.submitter.cancel(message_id)
        if status is None:
            raise BadInput(404, "no such message")
        if status != Status.CANCELLED.value:
            return respond(schema.ApiError(error=f"cannot cancel a message that is {status}", status=status), 409)
        return respond(schema.MessageView(id=message_id, status=status))

    # --- operations ----------------------------------------------------------------------------------

    async def health(self, _: Request) -> Response:
        checks = {"redis": "ok"}
        try:
            await asyncio.wait_for(self.redis.ping(), timeout=2)
            # PING answers while writes are refused (full, a replica, too few replicas): try one
            await asyncio.wait_for(self.redis.set(self.keys.health, "1", px=10_000), timeout=2)
        except TimeoutError:
            checks["redis"] = "down"
        except UNAVAILABLE as exc:
            checks["redis"] = "down" if isinstance(exc, CONNECTION_ERRORS) else "degraded"
        if self.pool is not None:
            try:
                async with self.pool.connection(timeout=2) as conn:
                    await conn.execute("SELECT 1")
                checks["postgres"] = "ok"
            except (psycopg.Error, OSError, TimeoutError):
                checks["postgres"] = "down"
        status = "down" if checks["redis"] == "down" else "ok" if set(checks.values()) == {"ok"} else "degraded"
        return respond(schema.Health(status=status, checks=checks), 503 if status == "down" else 200)

    async def queues_status(self, _: Request) -> Response:
        statuses = await level_status(self.redis, self.keys, self.config)
        for s in statuses:
            QUEUE_DEPTH.labels(level=s.level).set(s.depth)
        return respond({"levels": statuses})

    async def metrics(self, _: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def dlq_list(self, request: Request) -> Response:
        limit = request.query_params.get("limit", "50")
        if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 1000:
            raise BadInput(422, "limit must be an integer from 1 to 1000", "limit")
        return respond([dl.summary() for dl in await self.dead.list(limit=int(limit))])

    async def dlq_show(self, request: Request) -> Response:
        dl = await self.dead.find(request.path_params["id"])
        if dl is None:
            raise BadInput(404, "no such dead letter")
        return respond(dl.summary() | {"request": dl.message.request if dl.message else None})

    async def dlq_replay(self, request: Request) -> Response:
        dl = await self.dead.find(request.path_params["id"])
        if dl is None:
            raise BadInput(404, "no such dead letter (already replayed?)")
        level = request.query_params.get("level")
        if level is not None and level not in self.levels:
            raise BadInput(422, f"unknown level {level!r}; valid levels: {', '.join(self.levels)}", "level")
        replayed = await self.dead.replay(dl, level=level)
        if not replayed:
            raise BadInput(409, "already replayed")
        return respond({"replayed": dl.entry_id, "message_id": dl.message_id})

    async def openapi_json(self, _: Request) -> Response:
        doc = schema.openapi(
            title="llmq",
            version="0.1.0",
            levels=self.levels,
            secured=bool(self.config.api_keys),
            max_wait_s=self.config.server.max_poll_wait.seconds,
        )
        return respond(doc)

    async def docs(self, _: Request) -> Response:
        return HTMLResponse(_DOCS)

    async def refresh_depth(self) -> None:
        """Keeps ``queue_depth`` current for Prometheus even when nobody asks for the status."""
        while True:
            try:
                for s in await level_status(self.redis, self.keys, self.config):
                    QUEUE_DEPTH.labels(level=s.level).set(s.depth)
            except UNAVAILABLE:
                pass
            except Exception:  # a loop boundary: the gauge must stay current after one failed read
                log.error("reading queue depths failed", exc_info=True)
            await asyncio.sleep(min(DEPTH_EVERY_S, self.config.queue.monitor_interval.seconds))


def _valid_id(message_id: str) -> bool:
    return 0 < len(message_id) <= 64 and all(c.isalnum() or c == "-" for c in message_id)


def create_app(
    config: Config, *, redis: aioredis.Redis, keys: Keys, pool: AsyncConnectionPool | None = None
) -> Starlette:
    ingest = IngestApi(config, redis=redis, keys=keys, pool=pool)
    openai = OpenAIFacade(ingest)
    routes = [
        ("/api/v1/messages", ingest.submit, ["POST"]),
        ("/api/v1/messages/batch", ingest.submit_batch, ["POST"]),
        ("/api/v1/messages/{id}", ingest.message, ["GET", "DELETE"]),
        ("/v1/chat/completions", openai.chat_completions, ["POST"]),
        ("/v1/models", openai.models, ["GET"]),
        ("/api/v1/health", ingest.health, ["GET"]),
        ("/api/v1/queues/status", ingest.queues_status, ["GET"]),
        ("/api/v1/dlq", ingest.dlq_list, ["GET"]),
        ("/api/v1/dlq/{id}", ingest.dlq_show, ["GET"]),
        ("/api/v1/dlq/{id}/replay", ingest.dlq_replay, ["POST"]),
        (config.metrics.path, ingest.metrics, ["GET"]),
        ("/api/v1/metrics", ingest.metrics, ["GET"]),
        ("/openapi.json", ingest.openapi_json, ["GET"]),
        ("/docs", ingest.docs, ["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        ingest.waiter.start()
        depth = asyncio.create_task(ingest.refresh_depth())
        if pool is not None:
            await pool.open(wait=False)
        try:
            yield
        finally:
            depth.cancel()
            await ingest.waiter.close()
            if pool is not None:
                await pool.close()

    return Starlette(
        routes=[Route(path, handled(path, fn), methods=methods) for path, fn, methods in routes],
        middleware=[Middleware(ApiKeyMiddleware, keys=list(config.api_keys), metrics_path=config.metrics.path)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )


_DOCS = """<!doctype html>
<html><head><title>llmq API</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
<noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>
"""
