"""The native message API: submit one or a batch, read (long-polling for the outcome), cancel.

Submissions go through ``llmq.pipeline.submit`` (backpressure, idempotency, XADD and status hash in
one atomic script). Reads long-poll on the ``finished`` channel and fall back to the PostgreSQL archive
(``archived``) once the status hash has expired. ``Messages`` is also what the OpenAI facade queues
through: ``enqueue`` and ``wait_result``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from llmq.pipeline.config import Config
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import Message, Status, new_id
from llmq.pipeline.notify import Waiter
from llmq.pipeline.streamed import valid_event_id
from llmq.pipeline.submit import (
    Quota,
    Submission,
    Submitted,
    Submitter,
    Verdict,
    new_message,
    over_tpm,
    request_digest,
)
from llmq.stages.ingest import schema, sse
from llmq.stages.ingest.archived import read_archived
from llmq.stages.ingest.drain import DrainMeter
from llmq.stages.ingest.events import EventHub
from llmq.stages.ingest.http_api import (
    INGESTED,
    REJECTED,
    ArchiveUnavailable,
    BadInput,
    caller,
    check_webhook_url,
    decode_json,
    encode_message,
    field_of,
    idempotency_conflict,
    read_body,
    reject,
    respond,
    tenant_of,
)
from llmq.stages.ingest.sse import Item, life

RESUMES = Counter("llmq_stream_resumes_total", "Event streams opened after an event id (a client resuming)")
DISCONNECT_CANCELS = Counter(
    "llmq_disconnect_cancels_total", "Streamed messages cancelled before dispatch because their client went away"
)
_submit_decoder = msgspec.json.Decoder(schema.SubmitBody)
_any_decoder = msgspec.json.Decoder()


class Messages:
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
        self.max_body = config.server.max_body_bytes
        self.hub = EventHub(redis)
        self.drain = DrainMeter(redis, keys, [lv.name for lv in config.queue.levels])
        first_levels = {lv.name for lv in sorted(config.queue.levels, key=lambda lv: lv.priority)[:2]}
        self._cancel_on_disconnect = {
            lv.name: lv.cancel_on_disconnect if lv.cancel_on_disconnect is not None else lv.name in first_levels
            for lv in config.queue.levels
        }
        self._abort_on_disconnect = {lv.name: lv.abort_on_disconnect for lv in config.queue.levels}
        self._withdrawing: set[asyncio.Task[Any]] = set()

    async def enqueue(self, submission: Submission) -> Submitted:
        """Submit one message (the OpenAI facade's way in)."""
        return await self.submitter.submit(submission)

    async def wait_result(self, message_id: str, timeout_s: float) -> tuple[bool, schema.MessageView | None]:
        """Wait up to ``timeout_s`` for the message to end: whether it did, and its view. Each check reads the
        whole view, so the one after the end's notice is the answer too (a round trip less on every call)."""
        last: list[schema.MessageView | None] = [None]

        async def ended() -> bool:
            last[0] = view = await self.view(message_id)
            return view is None or Status(view.status).terminal

        finished = await self.waiter.wait(message_id, ended, timeout_s)
        return finished, last[0]

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
        if not isinstance(sub.request.get("stream", False), bool):
            raise BadInput(422, "request.stream must be true or false", f"{where}request.stream")
        tenant = tenant_of(request, sub.tenant, f"{where}tenant")
        check_webhook_url(self.config, sub.metadata, tenant, f"{where}metadata.webhook_url")
        msg = new_message(
            message_id=new_id(),
            level=sub.level,
            request=sub.request,
            session_id=sub.session_id,
            tenant=tenant,
            idempotency_key=sub.idempotency_key,
            deadline_ms=sub.deadline_ms,
            metadata=sub.metadata,
        )
        if why := over_tpm(self.config, msg):
            raise BadInput(422, why, f"{where}request.max_tokens")
        try:
            digest = request_digest(sub) if sub.idempotency_key else ""
        except ValueError as exc:
            raise BadInput(422, f"the request is {exc}", f"{where}request") from None
        return Submission(msg, encode_message(msg, where), caller=caller(request), digest=digest)

    def _accepted(self, msg: Message, result: Submitted) -> tuple[int, schema.Accepted]:
        if result.verdict is Verdict.DUPLICATE:
            return 200, schema.Accepted(id=result.message_id or "", status="duplicate", level=msg.level)
        INGESTED.labels(level=msg.level).inc()
        if result.admitted:  # admitted at once: on its way already
            return 202, schema.Accepted(id=msg.id, status=Status.SCHEDULED.value, level=msg.level, position=0)
        eta = self.drain.wait_s(msg.level, result.depth) if result.depth is not None else None
        return 202, schema.Accepted(
            id=msg.id, status=Status.QUEUED.value, level=msg.level, position=result.depth, eta_s=eta
        )

    def full(self, level: str, depth: int) -> dict[str, str]:
        """The Retry-After of a 429 for a full level: when, at its measured drain rate, it will have room."""
        over = depth - self.submitter.max_size[level] + 1
        return {"Retry-After": str(self.drain.retry_after_s(level, max(1, over)))}

    def limited(self, level: str, quota: Quota) -> dict[str, str]:
        """The Retry-After of a 429 for a tenant over a quota: when its rate allows the message, or when, at the
        level's measured drain rate, enough of its open messages will have ended."""
        if quota.name == "max_queued":
            return {"Retry-After": str(self.drain.retry_after_s(level, max(1, quota.figure - quota.limit + 1)))}
        return {"Retry-After": str(quota.retry_after_s)}

    async def submit(self, request: Request) -> Response:
        body = await read_body(request, limit=self.max_body)
        submission = self._message(decode_json(_submit_decoder, body), request)
        msg = submission.message
        result = await self.submitter.submit(submission)
        if result.verdict is Verdict.CONFLICT:
            raise BadInput(422, idempotency_conflict(result.message_id), "idempotency_key")
        if result.verdict is Verdict.FULL:
            headers = self.full(msg.level, result.depth or 0)
            return reject(429, f"level {msg.level!r} is full ({result.depth} waiting)", headers=headers)
        if result.quota is not None:
            headers = self.limited(msg.level, result.quota)
            return reject(429, result.quota.describe(msg.tenant), "tenant", headers=headers)
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
            if result.quota is not None:
                REJECTED.labels(reason="quota").inc()
                results[i] = schema.BatchItem(
                    index=i, status_code=429, error=result.quota.describe(msg.tenant), field=f"[{i}].tenant"
                )
                continue
            code, doc = self._accepted(msg, result)
            results[i] = schema.BatchItem(index=i, status_code=code, id=doc.id, status=doc.status, level=msg.level)
        return respond(results)

    async def view(self, message_id: str) -> schema.MessageView | None:
        """The message's status hash, or its archived row once the hash has expired."""
        fields: Any = await self.redis.hgetall(self.keys.msg(message_id))
        if fields:
            view = _from_hash(message_id, fields)
            behind, left_mark = fields.get(b"behind"), fields.get(b"left_mark")
            if view.status == Status.QUEUED.value and view.level and behind is not None and left_mark is not None:
                view.position, view.eta_s = self.drain.position(view.level, int(behind), int(left_mark))
            return view
        return await read_archived(self.pool, message_id) if self.pool is not None else None

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
        if not valid_id(message_id):
            raise BadInput(404, "no such message")
        view = await self.view(message_id)
        if view is None:
            raise BadInput(404, "no such message")
        if wait_s and not Status(view.status).terminal:
            await self.waiter.wait(message_id, lambda: self.terminal(message_id), wait_s)
            view = await self.view(message_id) or view
        return respond(view)

    async def follow(self, message_id: str, *, after: str = "0-0", idle_s: float | None = None) -> AsyncIterator[Item]:
        """The message's life from ``after`` (an events stream id) to its end (or, with ``idle_s``, until that
        long passed without an item)."""
        streamed = await self.redis.hget(self.keys.msg(message_id), "streamed")

        async def wait_end(seconds: float) -> bool:
            return await self.waiter.wait(message_id, lambda: self.terminal(message_id), seconds)

        async for item in life(
            self.redis,
            self.keys,
            self.hub,
            message_id,
            streamed=bool(streamed),
            after=after,
            wait_end=wait_end,
            drain=self.drain,
            idle_s=idle_s,
        ):
            yield item

    def wait_s(self, level: str, ahead: int) -> float | None:
        """The estimated wait of a message with ``ahead`` before it in ``level`` (``DrainMeter``)."""
        return self.drain.wait_s(level, ahead)

    def gone_away(self, message_id: str, level: str) -> None:
        """The client of a streamed message went away before its end: cancel it if it has not reached a
        backend and its level says so (``cancel_on_disconnect``); after, its backend call is stopped when the level
        says so (``abort_on_disconnect``), or it runs on and stays retrievable."""
        before, after = self._cancel_on_disconnect.get(level, False), self._abort_on_disconnect.get(level, False)
        if not (before or after):
            return
        task = asyncio.create_task(self.submitter.cancel(message_id, before=before, abort=after))
        self._withdrawing.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._withdrawn)

    def _withdrawn(self, task: asyncio.Task[Any]) -> None:
        self._withdrawing.discard(task)
        if not task.cancelled() and task.exception() is None and task.result() == Status.CANCELLED.value:
            DISCONNECT_CANCELS.inc()

    async def events(self, request: Request) -> Response:
        """``GET /api/v1/messages/{id}/events``: the message's life as server-sent events, from after
        ``Last-Event-ID`` (or ``?after=``) when given. A stream with no event for ``server.max_poll_wait`` ends
        (with a comment saying to reconnect): EventSource clients reconnect by themselves."""
        message_id = request.path_params["id"]
        after = request.headers.get("last-event-id") or request.query_params.get("after") or "0-0"
        if not valid_event_id(after):
            field = "Last-Event-ID" if request.headers.get("last-event-id") else "after"
            raise BadInput(422, f"{field} must be an event id as sent (<ms>-<seq>)", field)
        if not valid_id(message_id) or not await self.redis.exists(self.keys.msg(message_id)):
            raise BadInput(404, "no such message (or its events have expired)")
        if request.headers.get("last-event-id") or request.query_params.get("after"):
            RESUMES.inc()

        async def body() -> AsyncIterator[bytes]:
            sse.OPEN_STREAMS.inc()
            try:
                yield sse.RETRY
                ended = False
                async for item in self.follow(message_id, after=after, idle_s=self.config.server.max_poll_wait.seconds):
                    ended = item.kind == "end"
                    yield sse.native(item)
                if not ended:
                    yield sse.comment("no event for a while: reconnect with Last-Event-ID to go on")
            finally:
                sse.OPEN_STREAMS.dec()

        return StreamingResponse(body(), media_type="text/event-stream", headers=sse.SSE_HEADERS)

    async def terminal(self, message_id: str) -> bool:
        raw: Any = await self.redis.hget(self.keys.msg(message_id), "status")
        return raw is None or Status(raw.decode()).terminal

    async def message(self, request: Request) -> Response:
        """One route for both methods, so a 405 lists every allowed method."""
        return await (self.cancel(request) if request.method == "DELETE" else self.get_message(request))

    async def cancel(self, request: Request) -> Response:
        message_id = request.path_params["id"]
        if not valid_id(message_id):
            raise BadInput(404, "no such message")
        status = await self.submitter.cancel(message_id)
        if status is None:
            raise BadInput(404, "no such message")
        if status != Status.CANCELLED.value:
            return respond(schema.ApiError(error=f"cannot cancel a message that is {status}", status=status), 409)
        return respond(schema.MessageView(id=message_id, status=status))


def valid_id(message_id: str) -> bool:
    return 0 < len(message_id) <= 64 and all(c.isalnum() or c == "-" for c in message_id)


def _from_hash(message_id: str, fields: dict[bytes, bytes]) -> schema.MessageView:
    raw_result = fields.pop(b"result", None)
    raw_errors = fields.pop(b"errors", None)
    doc = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
    # The stored JSON as it is: decoding it could fail on an answer nested deeper than this stack
    result = msgspec.Raw(raw_result) if raw_result is not None else None
    return schema.MessageView(
        id=message_id,
        status=doc.get("status", "unknown"),
        level=doc.get("level"),
        attempts=int(doc.get("attempts", 0)),
        backend=doc.get("backend"),
        result=result,
        error=doc.get("error") or None,
        errors=schema.error_lines(raw_errors),
        first_token_ms=_time(doc, "first_token_ms"),
        enqueued_at=_time(doc, "enqueued_at"),
        scheduled_at=_time(doc, "scheduled_at"),
        started_at=_time(doc, "started_at"),
        finished_at=_time(doc, "finished_at"),
        retry_at=_time(doc, "retry_at"),
    )


def _time(doc: dict[str, str], field: str) -> float | None:
    return float(doc[field]) if doc.get(field) else None
