"""A call to a backend: making it (``Caller``), and what its answer means after (``classify``: completed,
retried or failed; ``storable``). Its estimated cost in tokens is ``llmq.pipeline.tokens``'."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram

from llmq.pipeline.chunks import Assembler
from llmq.pipeline.config import BackendConfig, Config
from llmq.pipeline.echo import ECHO_SCHEME, answer
from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import Coalesced, Lua
from llmq.pipeline.models import Message, Status
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.effects import Effect
from llmq.pipeline.streamed import CHUNK, END, USAGE, is_streamed
from llmq.pipeline.window import Windows
from llmq.stages.dispatch.http_pool import Answer, HTTPError, Pool, Reply, Unsendable
from llmq.stages.dispatch.relay import Relay

if TYPE_CHECKING:
    from llmq.stages.dispatch.routing import Router

log = logging.getLogger("llmq.dispatch")

_SURROGATE = re.compile("[\ud800-\udfff]")
"""A lone surrogate: ``json.loads`` joins an escaped pair into one character, so any left is alone."""
RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
CAPACITY_STATUS = frozenset({429, 503, 529})
"""Answers that say "I'm full", not "I'm broken": 429 (rate limits; vLLM's bounded waiting queue in some
versions), 503 (vLLM's ``--max-num-queued-reqs``, Ollama's ``OLLAMA_MAX_QUEUE``, llama.cpp, SGLang, Ray
Serve), 529 (Dynamo, Anthropic)."""
DROPPED = "x-llm-d-request-dropped-reason"
"""llm-d's gateway names why it shed a request: a capacity signal whatever the status."""


def is_capacity(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an error answer is the backend saying it is full (retried, and its window shrinks; the
    circuit is spared) rather than a fault (retried, counted toward the circuit) or the request's fault."""
    return status in CAPACITY_STATUS or DROPPED in headers


class CallResult(msgspec.Struct, kw_only=True):
    status: Status
    backend: str
    response: dict[str, Any] | None = None
    error: str | None = None
    retry_after: float | None = None
    """Seconds the backend asked to wait (Retry-After), clamped to ``queue.retry.max_backoff``."""
    capacity: bool = False
    """The backend refused the call for lack of capacity (``is_capacity``)."""
    tokens_used: int | None = None
    """Total tokens the response's ``usage`` reports."""
    acquired_at: float | None = None
    """When the backend's slot was taken: the minute its rpm and tpm counted the call in (None when this
    attempt counted nothing: the slot was held already)."""
    first_token_ms: float | None = None
    """A streamed call's time from being sent to its first chunk."""


TOKENS_MAX = 2**63 - 1


def token_count(value: object) -> int | None:
    """A token count a backend reported, when it is one: an integer from 0 to what PostgreSQL's bigint holds."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= TOKENS_MAX:
        return value
    return None


def retry_after(value: str | None, *, max_s: float, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110), never negative,
    at most ``max_s``. None when absent or unreadable: ``inf``, ``nan`` and garbage are ignored rather than
    parking a message, or a backend's circuit, for ever."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), max_s)


def _body(response: Answer) -> Any:
    """The JSON body: msgspec's parser, or the standard one for what msgspec refuses (escaped lone
    surrogates, NaN), which ``storable`` then cleans."""
    try:
        try:
            return msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            return json.loads(response.content)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def clean_text(text: str) -> str:
    """``text`` with U+FFFD for each lone surrogate, so it can be stored (encoded as UTF-8)."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def storable(body: Any) -> tuple[Any, str | None]:
    """``body`` made storable (msgpack and JSON as UTF-8): strings with lone surrogates get U+FFFD in
    their place. With a value no store takes (an integer past 64 bits), None and the reason."""
    problems: list[str] = []

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, str):
            return clean_text(value)
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return value
        if isinstance(value, int):
            if not -(2**63) <= value < 2**64:
                problems.append(f"an integer past 64 bits at {path or '<root>'}")
            return value
        if isinstance(value, dict):
            cleaned: dict[Any, Any] = {}
            for k, v in value.items():
                key = clean(k, path)  # the path names the key as it will be stored
                cleaned[key] = clean(v, f"{path}.{key}" if path else str(key))
            return cleaned
        if isinstance(value, list):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(body, "")
    return (None, problems[0]) if problems else (cleaned, None)


async def sse_data(reply: Reply) -> AsyncIterator[bytes]:
    """The value of each ``data:`` line of a server-sent event stream, as bytes. Lines end at LF (CRLF) only:
    a JSON string may hold U+2028 or U+0085 unescaped, where a text line reader would cut it."""
    buffer = bytearray()
    async for piece in reply.pieces():
        start = len(buffer)
        buffer += piece
        at = buffer.find(b"\n", start)
        begin = 0
        while at >= 0:
            line = bytes(buffer[begin:at]).rstrip(b"\r")
            if line.startswith(b"data:"):
                yield line[5:].strip()
            begin = at + 1
            at = buffer.find(b"\n", begin)
        del buffer[:begin]
    line = bytes(buffer).rstrip(b"\r")
    if line.startswith(b"data:"):
        yield line[5:].strip()


def _chunk(data: bytes) -> Any:
    """A chunk's JSON: msgspec's parser, or the standard one for what msgspec refuses (an escaped lone
    surrogate, which ``storable`` then cleans); ValueError when it is no JSON."""
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError("nested too deeply") from None


def relay_whole(relay: Relay, body: dict[str, Any]) -> None:
    """A whole answer (the echo backend's, or a backend's that ignored ``stream``) as the one chunk a
    streaming client reads (a legacy completion's as one with ``text``)."""
    legacy = body.get("object") == "text_completion"
    head = {k: body.get(k) for k in ("id", "created", "model")}
    head["object"] = "text_completion" if legacy else "chat.completion.chunk"
    choices = body.get("choices")
    pieces = []
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        piece = {"index": choice.get("index", 0), "finish_reason": choice.get("finish_reason")}
        if legacy:
            piece["text"] = choice.get("text")
        else:
            piece["delta"] = choice.get("message")
        pieces.append(piece)
    relay.add(_json.encode(head | {"choices": pieces}))
    if isinstance(body.get("usage"), dict):
        relay.add(_json.encode(head | {"choices": [], "usage": body["usage"]}), usage_only=True)


def classify(name: str, response: Answer, *, max_retry_after_s: float) -> CallResult:
    """The outcome a backend's answer gives: a completion body (a JSON object) completes; a success whose
    body is not one, or a retryable status, is retried; any other status fails."""
    if response.is_success:
        try:
            body = _body(response)
        except ValueError:
            return CallResult(status=Status.RETRYING, backend=name, error="backend answered invalid JSON")
        if not isinstance(body, dict):
            error = f"backend answered JSON that is not an object: {response.text[:100]}"
            return CallResult(status=Status.RETRYING, backend=name, error=error)
        return CallResult(status=Status.COMPLETED, backend=name, response=body)
    detail = clean_text(response.text[:500])  # its charset may be any: utf-7 decodes to lone surrogates
    error = f"backend {name} answered {response.status}: {detail}"
    capacity = is_capacity(response.status, response.headers)
    if capacity or response.status in RETRYABLE_STATUS:
        wait = retry_after(response.headers.get("retry-after"), max_s=max_retry_after_s)
        return CallResult(status=Status.RETRYING, backend=name, error=error, retry_after=wait, capacity=capacity)
    return CallResult(status=Status.FAILED, backend=name, error=error)


DISPATCHED = Counter("llmq_dispatch_total", "Backend calls by outcome", ["backend", "outcome"])
DURATION = Histogram(
    "llmq_dispatch_duration_seconds",
    "Backend call duration",
    ["backend"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BACKEND_INFLIGHT = Gauge("llmq_backend_inflight", "Calls this process has running on the backend", ["backend"])
TOKENS = Counter("llmq_tokens_total", "Tokens reported by backends", ["backend", "kind"])
FIRST_TOKEN = Histogram(
    "llmq_time_to_first_token_seconds",
    "From sending a streamed call to its first chunk",
    ["level", "backend"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INTER_TOKEN = Histogram(
    "llmq_inter_token_seconds",
    "Between two chunks of a streamed call",
    ["backend"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
_json = msgspec.json.Encoder()


class _Meters:
    """One backend's labelled metric children, looked up once: labels() costs about 2 µs a call, and a
    call used six."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.inflight = BACKEND_INFLIGHT.labels(backend=backend)
        self.duration = DURATION.labels(backend=backend)
        self.prompt_tokens = TOKENS.labels(backend=backend, kind="prompt")
        self.completion_tokens = TOKENS.labels(backend=backend, kind="completion")
        self.gap = INTER_TOKEN.labels(backend=backend)
        self._outcomes: dict[Status, Counter] = {}
        self._first: dict[str, Histogram] = {}

    def first_token(self, level: str) -> Histogram:
        if level not in self._first:
            self._first[level] = FIRST_TOKEN.labels(level=level, backend=self.backend)
        return self._first[level]

    def outcome(self, status: Status) -> Counter:
        if status not in self._outcomes:  # only the outcomes that happen get a series
            self._outcomes[status] = DISPATCHED.labels(backend=self.backend, outcome=status.value)
        return self._outcomes[status]


class Caller:
    """Makes the calls: over pooled HTTP (or in-process for ``echo://``), bounded by ``scheduler.timeout`` as a
    whole, each answer read into a ``CallResult`` and counted; the backend's circuit learns of it."""

    def __init__(
        self, config: Config, *, http: Pool, router: Router, windows: Windows, redis: aioredis.Redis, keys: Keys
    ) -> None:
        self.windows = windows
        self.level_priority = {lv.name: lv.priority for lv in config.queue.levels}
        self.redis = redis
        self.keys = keys
        self._relay = Coalesced(Lua(redis, "relay"))
        self.timeout_s = config.scheduler.timeout.seconds
        self.max_retry_after_s = config.queue.retry.max_backoff.seconds
        self.http = http
        self.router = router
        self.local_inflight = dict.fromkeys(router.backends, 0)
        self.meters = {name: _Meters(name) for name in router.backends}

    async def send(
        self,
        batch: Batch,
        backend: BackendConfig,
        msg: Message,
        *,
        free: Effect,
        acquired_at: float | None,
        streamed_before: bool,
    ) -> CallResult | None:
        """Call ``backend`` for ``msg`` (its slot held); the slot is freed with the next commit (``free``).
        ``streamed_before``: its events stream holds an earlier attempt's entries, to be read first.
        None when, streaming, it found its message taken over by another dispatcher: theirs to record."""
        headers = {"X-LLMQ-Message-Id": msg.id}
        key = os.environ.get(backend.api_key_env, "").strip() if backend.api_key_env else ""
        if key:  # a key read from a file (a Kubernetes secret) often ends with a newline
            headers["Authorization"] = f"Bearer {key}"
        priority = self.level_priority.get(msg.level)
        if backend.priority_header and priority is not None:
            headers[backend.priority_header] = str(priority)
        meters = self.meters[backend.name]
        self.local_inflight[backend.name] += 1
        meters.inflight.set(self.local_inflight[backend.name])
        sent_at, started = time.time(), time.perf_counter()
        self.windows.sent(backend.name, sent_at)
        timed_out = False
        relay = (
            Relay(self._relay, self.keys.events(msg.id), self.keys.msg(msg.id), backend=backend.name, sent_at=sent_at)
            if is_streamed(msg)
            else None
        )
        assembled = Assembler()
        try:
            earlier = await self._streamed_before(backend.name, relay) if relay and streamed_before else None
            if earlier is not None:
                result = earlier
            elif backend.url.startswith(ECHO_SCHEME):
                body = answer(msg.endpoint, msg.request, name=backend.name, default_model="echo")
                result = CallResult(status=Status.COMPLETED, backend=backend.name, response=body)
                if relay is not None:
                    relay_whole(relay, body)
            else:
                # scheduler.timeout bounds the whole call: the pool's timeouts are per read, so a backend that
                # trickles its answer would hold the call (and its backend slot, past its lease) for longer.
                async with asyncio.timeout(self.timeout_s):
                    if relay is not None:
                        result = await self._stream(backend, msg, headers, relay, assembled)
                    else:
                        url = backend.url.rstrip("/") + "/" + msg.endpoint
                        response = await self.http.post(url, _json.encode(self._body(backend, msg)), headers)
                        result = self._read(backend.name, response)
            if result.response is not None:
                result.tokens_used = self._count_tokens(backend.name, result.response)
        except TimeoutError:
            timed_out = True
            error = f"timeout after {self.timeout_s:g}s"
            result = self._broken_off(backend.name, error, relay, assembled)
        except Unsendable as exc:  # as configured, it would fail the same way again: no retry, no fault of the backend
            error = f"the request to backend {backend.name} cannot be sent: {exc}"
            result = CallResult(status=Status.FAILED, backend=backend.name, error=error)
        except HTTPError as exc:
            result = self._broken_off(backend.name, f"connection error: {exc}", relay, assembled)
        except UnicodeError as exc:  # a chunk in no encoding msgspec or json read: nothing it sent is storable
            result = self._broken_off(backend.name, f"backend streamed what cannot be read: {exc}", relay, assembled)
        finally:
            if relay is not None:
                await relay.close()
            self.local_inflight[backend.name] -= 1
            meters.inflight.set(self.local_inflight[backend.name])
            meters.duration.observe(time.perf_counter() - started)
            # The slot is freed with the outcome's commit, which follows at once (the lease expires anyway)
            batch.also(free)
        if relay is not None and relay.refused:
            log.warning("message %s was taken over while this dispatcher streamed it", msg.id)
            return None
        result.acquired_at = acquired_at
        result.first_token_ms = relay.first_token_ms if relay is not None else None
        # "Full" while running none of our calls is no capacity signal but a fault (a proxy's "no healthy
        # upstream"): counted toward the circuit, so a backend that only answers 503 is taken out.
        self.router.record(backend.name, result, busy=self.local_inflight[backend.name] > 0)
        if result.status is Status.COMPLETED or result.capacity or timed_out:
            self.windows.observe(backend.name, full=result.capacity or timed_out, sent_at=sent_at)
        meters.outcome(result.status).inc()
        return result

    async def _stream(
        self,
        backend: BackendConfig,
        msg: Message,
        headers: dict[str, str],
        relay: Relay,
        assembled: Assembler,
    ) -> CallResult:
        """A streamed call: each chunk to the message's events stream as it comes, and into the whole answer,
        which is the outcome (archived like a non-streamed one). ``usage`` is asked of the backend to count
        tokens; clients that did not ask for it do not get it."""
        body = self._body(backend, msg)
        options = body.get("stream_options")
        body["stream_options"] = (options if isinstance(options, dict) else {}) | {"include_usage": True}
        url = backend.url.rstrip("/") + "/" + msg.endpoint
        meters = self.meters[backend.name]
        started = time.perf_counter()
        last = 0.0
        async with self.http.stream(url, _json.encode(body), headers) as reply:
            if not reply.is_success:
                return self._read(backend.name, await reply.read())
            if not reply.headers.get("content-type", "").startswith("text/event-stream"):
                result = self._read(backend.name, await reply.read())  # a backend that answers a stream request whole
                if result.status is Status.COMPLETED and result.response is not None:
                    relay_whole(relay, result.response)
                return result
            async for data in sse_data(reply):
                if data == b"[DONE]":
                    break
                if relay.refused:
                    return self._broken_off(backend.name, "taken over", relay, assembled)
                if relay.aborted:  # leaving the block closes the connection: the backend stops generating
                    partial, _ = storable(assembled.completion())
                    error = f"the streaming client went away: the call to backend {backend.name} was stopped"
                    return CallResult(status=Status.CANCELLED, backend=backend.name, error=error, response=partial)
                try:
                    chunk = _chunk(data)
                except ValueError:
                    return self._broken_off(backend.name, "backend streamed a chunk that is not JSON", relay, assembled)
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error") is not None and not chunk.get("choices"):
                    error = chunk["error"]
                    detail = error.get("message") if isinstance(error, dict) else error
                    return self._broken_off(backend.name, f"backend streamed an error: {detail}", relay, assembled)
                now = time.perf_counter()
                if last:
                    meters.gap.observe(now - last)
                else:
                    meters.first_token(msg.level).observe(now - started)
                last = now
                assembled.add(chunk)
                relay.add(data, usage_only=chunk.get("choices") == [] and "usage" in chunk)
        if relay.written == 0:
            return CallResult(status=Status.RETRYING, backend=backend.name, error="backend streamed no chunk")
        answer, problem = storable(assembled.completion())
        if problem:
            return CallResult(status=Status.FAILED, backend=backend.name, error=f"the answer holds {problem}")
        return CallResult(status=Status.COMPLETED, backend=backend.name, response=answer)

    def _body(self, backend: BackendConfig, msg: Message) -> dict[str, Any]:
        """The request as the backend gets it: with its level's priority when it schedules by priority."""
        priority = self.level_priority.get(msg.level)
        if backend.priority == "vllm" and priority is not None:
            return msg.request | {"priority": priority}
        return dict(msg.request)

    async def _streamed_before(self, name: str, relay: Relay) -> CallResult | None:
        """An earlier attempt whose chunks clients may have seen (its dispatcher died mid-stream): the message
        fails with them, as a stream broken off does. A stream that ended (the message was replayed from the
        dead letters) starts again. None: nothing was streamed, call."""
        last: Any = await self.redis.xrevrange(relay.key, count=1)
        if not last:
            return None
        if END in last[0][1]:
            await self.redis.delete(relay.key)
            return None
        earlier = Assembler()
        entries: Any = await self.redis.xrange(relay.key)
        for _, fields in entries:
            data = fields.get(CHUNK) or fields.get(USAGE)
            if data:
                with contextlib.suppress(msgspec.DecodeError):
                    chunk = msgspec.json.decode(data)
                    if isinstance(chunk, dict):
                        earlier.add(chunk)
        partial, _ = storable(earlier.completion())
        error = f"the stream broke off after {earlier.chunks} chunks: its dispatcher stopped mid-stream"
        return CallResult(status=Status.FAILED, backend=name, error=error, response=partial)

    def _broken_off(self, name: str, error: str, relay: Relay | None, assembled: Assembler) -> CallResult:
        """A call that failed: retried as any other while its client saw nothing of it; once chunks were
        relayed, failed with what was answered so far (never a second generation spliced into the first)."""
        if relay is None or relay.written == 0:
            return CallResult(status=Status.RETRYING, backend=name, error=error)
        partial, _ = storable(assembled.completion())
        error = f"backend {name} broke off the stream after {relay.written} chunks: {error}"
        return CallResult(status=Status.FAILED, backend=name, error=error, response=partial)

    def _read(self, name: str, response: Answer) -> CallResult:
        """What the backend's answer means. Once a call has been made, nothing it answered may leave the
        message to be called again: an answer that breaks the reading fails the message, with the reason."""
        try:
            return classify(name, response, max_retry_after_s=self.max_retry_after_s)
        except Exception as exc:
            log.warning("backend %s answered what cannot be read", name, exc_info=True)
            error = f"backend {name} answered {response.status} with a body that cannot be read: {type(exc).__name__}"
            return CallResult(status=Status.FAILED, backend=name, error=error)

    def _count_tokens(self, name: str, body: dict[str, Any]) -> int | None:
        """Count what ``usage`` reports (a number that is not a token count, negative say, is ignored) and
        return its total."""
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return None
        prompt, completion = token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
        if prompt is not None:
            self.meters[name].prompt_tokens.inc(prompt)
        if completion is not None:
            self.meters[name].completion_tokens.inc(completion)
        return token_count(usage.get("total_tokens"))
