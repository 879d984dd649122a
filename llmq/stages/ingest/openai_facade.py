"""The OpenAI-compatible facade of the ingest API: ``POST /v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` queue the standard body at the priority named by ``X-LLMQ-Priority`` (or a ``priority``
field), wait for the outcome up to ``server.sync_timeout`` and return the backend's response unchanged, or
with ``stream: true`` relay its chunks as they come; ``GET /v1/models`` lists what the configured backends
serve. Errors come in OpenAI's shape, so the official SDK raises its own exceptions."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from llmq.pipeline.chunks import Assembler
from llmq.pipeline.config import Config
from llmq.pipeline.models import Status, new_id
from llmq.pipeline.submit import Quota, Submission, Submitted, Verdict, new_message, over_tpm, request_digest
from llmq.pipeline.tokens import CHAT, prompt_chars
from llmq.stages.ingest import schema, sse
from llmq.stages.ingest.http_api import (
    INGESTED,
    BadInput,
    caller,
    decode_json,
    encode_message,
    idempotency_conflict,
    openai_error,
    read_body,
    respond,
    tenant_of,
)
from llmq.stages.ingest.sse import OPEN_STREAMS, SSE_HEADERS, Item

_answered = re.compile(r"answered (\d{3}):")
_any_decoder = msgspec.json.Decoder()


class Queue(Protocol):
    """What the facade needs of the queue: the native message API (``messages.Messages``) provides it."""

    levels: list[str]
    max_body: int

    async def enqueue(self, submission: Submission) -> Submitted: ...

    async def wait_result(self, message_id: str, timeout_s: float) -> tuple[bool, schema.MessageView | None]: ...

    def follow(self, message_id: str, *, after: str = "0-0") -> AsyncIterator[Item]: ...

    def gone_away(self, message_id: str, level: str) -> None: ...

    def wait_s(self, level: str, ahead: int) -> float | None: ...

    def full(self, level: str, depth: int) -> dict[str, str]: ...

    def limited(self, level: str, quota: Quota) -> dict[str, str]: ...


class OpenAIFacade:
    def __init__(self, queue: Queue, config: Config) -> None:
        self.queue = queue
        self.config = config

    async def chat_completions(self, request: Request) -> Response:
        return await self._create(request, "chat/completions")

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``: the legacy completions API, streamed or not."""
        return await self._create(request, "completions")

    async def embeddings(self, request: Request) -> Response:
        """``POST /v1/embeddings``: queued like any request, answered whole."""
        return await self._create(request, "embeddings")

    async def _create(self, request: Request, endpoint: str) -> Response:
        try:
            body = await read_body(request, limit=self.queue.max_body)
            doc = decode_json(_any_decoder, body)
        except BadInput as exc:
            return openai_error(exc.status, exc.message)
        if not isinstance(doc, dict):
            return openai_error(400, "the body must be a JSON object")
        refused = _refused(endpoint, doc)
        if refused is not None:
            return refused
        stream = doc.get("stream", False)
        if not isinstance(stream, bool) or (stream and endpoint == "embeddings"):
            message = "embeddings are not streamed" if endpoint == "embeddings" else "stream must be true or false"
            return openai_error(400, message, param="stream")
        options = doc.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            return openai_error(
                400, "stream_options must be an object, and only with stream=true", param="stream_options"
            )
        model = doc.get("model")
        backends = self.config.backends
        if backends and not any(not b.models or model in b.models for b in backends):
            return openai_error(404, f"no backend serves model {model!r}", param="model", kind="model_not_found")
        body_priority = doc.pop("priority", None)  # llmq's field, not the backend's
        level = request.headers.get("x-llmq-priority") or body_priority or "normal"
        if level not in self.queue.levels:
            return openai_error(
                400, f"unknown priority {level!r}; levels: {', '.join(self.queue.levels)}", param="priority"
            )
        # The headers hold what the native API's fields do, with the same limits; an empty one is none.
        named = {}
        for header in ("x-llmq-session-id", "x-llmq-tenant", "idempotency-key"):
            value = request.headers.get(header) or None
            if value is not None and len(value) > schema.TEXT_MAX:
                return openai_error(400, f"{header} is over {schema.TEXT_MAX} characters", param=header)
            named[header] = value
        try:
            tenant = tenant_of(request, named["x-llmq-tenant"], "X-LLMQ-Tenant")
        except BadInput as exc:
            return openai_error(exc.status, exc.message, param=exc.field, kind="permission_error")
        msg = new_message(
            message_id=new_id(),
            level=level,
            request=doc,
            session_id=named["x-llmq-session-id"],
            tenant=tenant,
            idempotency_key=named["idempotency-key"],
            endpoint=endpoint,
        )
        if why := over_tpm(self.config, msg):
            return openai_error(400, why, param="max_tokens")
        try:
            payload = encode_message(msg)
        except BadInput as exc:
            return openai_error(400, exc.message)
        try:
            scope = [level, msg.session_id, msg.tenant, doc] + ([] if endpoint == "chat/completions" else [endpoint])
            digest = request_digest(scope) if msg.idempotency_key else ""
        except ValueError as exc:
            return openai_error(400, f"the request is {exc}")
        result = await self.queue.enqueue(Submission(msg, payload, caller=caller(request), digest=digest))
        if result.verdict is Verdict.CONFLICT:
            return openai_error(422, idempotency_conflict(result.message_id), param="Idempotency-Key")
        if result.verdict is Verdict.FULL:
            response = openai_error(429, f"priority level {level!r} is full; retry later", kind="rate_limit_error")
            response.headers.update(self.queue.full(level, result.depth or 0))
            return response
        if result.quota is not None:
            response = openai_error(
                429, result.quota.describe(msg.tenant), param="X-LLMQ-Tenant", kind="rate_limit_error"
            )
            response.headers.update(self.queue.limited(level, result.quota))
            return response
        message_id = result.message_id or msg.id
        if result.verdict is Verdict.QUEUED:
            INGESTED.labels(level=level).inc()
        headers = {"X-LLMQ-Message-Id": message_id}
        if stream:
            usage = isinstance(options, dict) and options.get("include_usage") is True
            # A repeat of an idempotent request follows the first one's message: going away, it leaves it be.
            owner = result.verdict is Verdict.QUEUED
            relay = self._relay(
                message_id,
                level,
                doc,
                result.depth,
                include_usage=usage,
                owner=owner,
                admitted=result.admitted,
                endpoint=endpoint,
            )
            return StreamingResponse(relay, media_type="text/event-stream", headers=headers | SSE_HEADERS)
        finished, view = await self.queue.wait_result(message_id, self.config.server.sync_timeout.seconds)
        if not finished or view is None:
            response = openai_error(
                504,
                f"no result within {self.config.server.sync_timeout}; poll GET /api/v1/messages/{message_id}",
                kind="timeout",
            )
        elif view.status == Status.COMPLETED.value and view.result is not None:
            return respond(view.result, headers=headers)
        else:
            response = failure(view)
        response.headers.update(headers)
        return response

    async def _relay(
        self,
        message_id: str,
        level: str,
        doc: dict[str, Any],
        position: int | None,
        *,
        include_usage: bool,
        owner: bool,
        admitted: bool = False,
        endpoint: str = CHAT,
    ) -> AsyncIterator[bytes]:
        """The stream a client of ``stream: true`` reads: comments while its request waits, then the backend's
        chunks as they come (each with the ``id:`` to resume from), then ``[DONE]``, or an error event."""
        ended = False
        counted = Assembler()  # only when the client asked for usage: the backend may send none
        usage_sent = False
        OPEN_STREAMS.inc()
        try:
            yield sse.comment(f"admitted in {level}" if admitted else self._waiting(level, position))
            async for item in self.queue.follow(message_id):
                if item.kind == "chunk":
                    if include_usage:
                        with contextlib.suppress(msgspec.DecodeError):
                            chunk = _any_decoder.decode(item.data)
                            if isinstance(chunk, dict):
                                counted.add(chunk)
                    yield sse.openai_chunk(item)
                elif item.kind == "usage":
                    if include_usage:
                        usage_sent = True
                        yield sse.openai_chunk(item)
                elif item.kind == "status":
                    status = _any_decoder.decode(item.data)
                    if status.get("status") == Status.QUEUED.value and "position" in status:
                        yield sse.comment(self._waiting(level, status["position"], status.get("eta_s")))
                    else:
                        yield sse.comment(item.data.decode())
                else:
                    ended = True
                    end = _any_decoder.decode(item.data)
                    if end.get("status") == Status.COMPLETED.value:
                        if include_usage and not usage_sent:
                            yield sse.openai_chunk(sse.Item("usage", counted_usage(doc, counted, endpoint)))
                        yield sse.DONE
                    else:
                        yield sse.openai_error(_ended_without_answer(end))
                    return
            # The stream was cut (the client read too slowly): say so, rather than end as if complete. The
            # client did not go away: its answer runs on, to be read where this says.
            ended = True
            yield sse.openai_error(f"the stream was cut: the whole answer is at GET /api/v1/messages/{message_id}")
        finally:
            OPEN_STREAMS.dec()
            if not ended and owner:
                self.queue.gone_away(message_id, level)

    def _waiting(self, level: str, ahead: int | None, wait_s: float | None = None) -> str:
        """What a waiting stream's comment says: its level, its place (1: next) and, once the level has been
        seen draining, about how long until it leaves the queue."""
        if ahead is None:
            return f"queued in {level}"
        wait_s = wait_s if wait_s is not None else self.queue.wait_s(level, ahead)
        return f"queued in {level}, position {ahead + 1}" + (f", about {wait_s:g} s" if wait_s is not None else "")

    async def models(self, _: Request) -> Response:
        seen: dict[str, str] = {}
        for b in self.config.backends:
            for m in b.models:
                seen.setdefault(m, b.name)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": owner} for m, owner in seen.items()]
        return respond({"object": "list", "data": data})


def _refused(endpoint: str, doc: dict[str, Any]) -> Response | None:
    """The 400 naming what the body of ``endpoint`` lacks, or None when it has what a backend needs."""
    if endpoint == "chat/completions":
        if not isinstance(doc.get("messages"), list) or not doc["messages"]:
            return openai_error(400, "messages must be a non-empty array", param="messages")
        for i, item in enumerate(doc["messages"]):
            if not isinstance(item, dict):
                return openai_error(400, "each message must be an object", param=f"messages[{i}]")
        return None
    field = "prompt" if endpoint == "completions" else "input"
    given = doc.get(field)
    if isinstance(given, str) or (isinstance(given, list) and given):
        return None
    return openai_error(400, f"{field} must be a string or a non-empty array", param=field)


def counted_usage(doc: dict[str, Any], counted: Assembler, endpoint: str = CHAT) -> bytes:
    """A usage chunk llmq counted, for a client that asked for one when the backend sent none: the prompt at
    about 4 characters a token, one token per chunk that carried text; with the stream's id and model."""
    prompt = max(1, prompt_chars(doc, endpoint) // 4)
    usage = {"prompt_tokens": prompt, "completion_tokens": counted.chunks, "total_tokens": prompt + counted.chunks}
    first = counted.first or {}
    head = {k: first.get(k) for k in ("id", "created", "model")} | {
        "object": first.get("object", "chat.completion.chunk")
    }
    return msgspec.json.encode(head | {"choices": [], "usage": usage})


def _ended_without_answer(end: dict[str, Any]) -> str:
    status = end.get("status")
    if status == Status.EXPIRED.value:
        return "the request expired before a backend was free"
    if status == Status.CANCELLED.value:
        return "the request was cancelled"
    return f"the request {status}: {end.get('error') or status}"


def failure(view: schema.MessageView) -> Response:
    """An ended-without-result message as an OpenAI error; a backend's own 4xx keeps its status."""
    error = view.error or view.status
    match = _answered.search(error)
    if view.status == Status.FAILED.value and match and 400 <= int(match.group(1)) < 500:
        return openai_error(int(match.group(1)), error)
    if view.status == Status.EXPIRED.value:
        return openai_error(504, "the request expired before a backend was free", kind="timeout")
    if view.status == Status.CANCELLED.value:
        return openai_error(409, "the request was cancelled", kind="cancelled")
    return openai_error(502, f"the request {view.status}: {error}", kind="api_error")
