"""mock-backend: an OpenAI-compatible server for development, tests and benchmarks.

``POST /v1/chat/completions`` answers after a configurable latency with a realistic body and ``usage``;
it can fail a fraction of calls with a chosen status (and Retry-After), and refuses calls beyond a
concurrency limit (429, or 503 as a vLLM with a bounded queue does). A request with ``stream: true`` is
answered as server-sent events, ``stream_tokens`` chunks at ``tokens_per_s`` (and, to test a backend dying
mid-stream, broken off after ``die_after_chunks``).
With ``engine_slots`` it runs that many calls at once and queues the rest, publishing the queue at
``GET /metrics`` as vLLM does. ``GET /stats`` counts calls (per ``X-LLMQ-Message-Id``, to find duplicates)
and the highest concurrency seen; ``POST /admin/config`` changes the behaviour at run time (tests use it to
make a backend fail and recover). Not a stand-in for Redis or Postgres: those are always real servers.

Its answers are ``llmq.pipeline.echo.completion``, which the dispatcher also gives for ``echo://`` backend URLs.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llmq.pipeline.chunks import made_up_chunks
from llmq.pipeline.echo import answer


class MockSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    latency_ms: float = 50.0
    jitter_ms: float = 0.0
    """Latency is uniform in latency_ms ± jitter_ms."""
    fail_rate: float = 0.0
    fail_status: int = 500
    retry_after_s: float | None = None
    """Sent with failures and with 429s from the concurrency limit."""
    busy_above: int = msgspec.field(default=0, name="max_concurrent")
    """Calls beyond this many at once are refused with ``busy_status``; 0 means unlimited (``max_concurrent``
    in its settings)."""
    busy_status: int = 429
    engine_slots: int = 0
    """Run at most this many calls at once and queue the others, as an inference engine does (0: no limit);
    ``GET /metrics`` publishes that queue as vLLM does."""
    engine_policy: Literal["fcfs", "priority"] = "fcfs"
    """The order of that queue: first come first served, or by the request's ``priority`` (lower first, then
    first come), as vLLM's ``--scheduling-policy priority`` orders its waiting requests."""
    """What a call beyond ``max_concurrent`` gets: 429, or 503 as vLLM's ``--max-num-queued-reqs`` answers."""
    models: list[str] = msgspec.field(default_factory=lambda: ["mock-1"])
    body: str | None = None
    """Answer this text (as application/json) instead of a completion: a backend that answers garbage."""
    trickle_s: float = 0.0
    """Send the answer in ten pieces over this many seconds after the latency: a backend that streams its
    answer slowly, each piece well within a read timeout."""
    stream_tokens: int = 20
    """Tokens of a streamed answer (``stream: true``), one chunk each."""
    tokens_per_s: float = 50.0
    """How fast a streamed answer's chunks come (0: all at once)."""
    die_after_chunks: int = 0
    """Break the connection off after this many chunks of a streamed answer: a backend dying mid-stream
    (0: never)."""
    stamp_chunks: bool = False
    """Each streamed chunk carries ``mock_sent_at``, the Unix time it was written: what a benchmark measures
    delivery lag from."""


_json = msgspec.json.Encoder()
_settings_decoder = msgspec.json.Decoder(MockSettings)


def _response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(doc), status_code=status, media_type="application/json", headers=headers)


async def _trickle(answer: bytes, seconds: float) -> AsyncIterator[bytes]:
    step = max(1, len(answer) // 10 + 1)
    for i in range(0, len(answer), step):
        yield answer[i : i + step]
        await asyncio.sleep(seconds / 10)


class MockBackend:
    def __init__(self, settings: MockSettings, *, name: str = "mock") -> None:
        self.settings = settings
        self.name = name
        self.calls = 0
        self.by_message: Counter[str] = Counter()
        self.current = 0
        self.peak = 0
        self.refused = 0
        self.priorities: Counter[str] = Counter()
        """The priority each call carried: vLLM's ``priority`` field, else an ``X-Priority`` header ("-": none)."""
        self.engine_waiting = 0
        """Calls queued inside the engine (``engine_slots``)."""
        self.engine_running = 0
        self._engine_free = 0
        self._engine_slots = 0
        self._engine_queue: list[tuple[float, int, asyncio.Future[None]]] = []
        self._engine_arrivals = 0
        """Calls refused beyond ``max_concurrent``."""
        self.broken_streams = 0
        """Streamed answers whose client went away before their end."""
        self.started_at = time.time()

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, "chat/completions", "messages")

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, "completions", "prompt")

    async def embeddings(self, request: Request) -> Response:
        return await self._answer(request, "embeddings", "input")

    async def _answer(self, request: Request, endpoint: str, required: str) -> Response:
        try:
            body = msgspec.json.decode(await request.body())
        except msgspec.DecodeError:
            return _response({"error": {"message": "invalid JSON", "type": "invalid_request_error"}}, 400)
        if not isinstance(body, dict) or required not in body:
            return _response({"error": {"message": f"{required} is required", "type": "invalid_request_error"}}, 400)
        s = self.settings
        self.calls += 1
        self.priorities[str(body.get("priority", request.headers.get("x-priority", "-")))] += 1
        message_id = request.headers.get("x-llmq-message-id")
        if message_id:
            self.by_message[message_id] += 1
        retry_headers = {"Retry-After": f"{s.retry_after_s:g}"} if s.retry_after_s is not None else None
        if s.busy_above and self.current >= s.busy_above:
            self.refused += 1
            error = {"message": "too many requests in flight", "type": "overloaded", "code": s.busy_status}
            return _response({"error": error}, s.busy_status, retry_headers)
        self.current += 1
        self.peak = max(self.peak, self.current)
        engine = False
        try:
            engine = await self._engine_slot(s, body)
            latency = max(0.0, s.latency_ms + random.uniform(-s.jitter_ms, s.jitter_ms)) / 1000
            await asyncio.sleep(latency)
            if s.fail_rate and random.random() < s.fail_rate:
                return _response(
                    {"error": {"message": "mock failure", "type": "server_error"}}, s.fail_status, retry_headers
                )
        finally:
            self.current -= 1
            if engine:  # (a streamed answer's tokens come after its slot is given back)
                self._engine_release()
        if body.get("stream") is True and s.body is None and endpoint != "embeddings":
            legacy = endpoint == "completions"
            chunks = made_up_chunks(
                body, name=self.name, default_model=s.models[0], tokens=s.stream_tokens, legacy=legacy
            )
            return StreamingResponse(self._stream(chunks), media_type="text/event-stream")
        reply = (
            s.body.encode()
            if s.body is not None
            else _json.encode(answer(endpoint, body, name=self.name, default_model=self.settings.models[0]))
        )
        if s.trickle_s:
            return StreamingResponse(_trickle(reply, s.trickle_s), media_type="application/json")
        return Response(reply, media_type="application/json")

    async def _stream(self, chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        s = self.settings
        gap = 1 / s.tokens_per_s if s.tokens_per_s > 0 else 0.0
        try:
            for i, chunk in enumerate(chunks):
                if s.die_after_chunks and i >= s.die_after_chunks:
                    raise ConnectionAbortedError("mock backend: dying mid-stream, as configured")
                if i and gap:
                    await asyncio.sleep(gap)
                if s.stamp_chunks:
                    chunk = chunk | {"mock_sent_at": time.time()}
                yield b"data: " + _json.encode(chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit, OSError):  # its client went away (as vLLM sees an abort)
            self.broken_streams += 1
            raise

    async def _engine_slot(self, s: MockSettings, body: dict[str, Any]) -> bool:
        """Wait in the engine's queue for one of its ``engine_slots`` (False: it has no limit)."""
        if not s.engine_slots:
            return False
        if s.engine_slots != self._engine_slots:  # (re)configured: the new size, less what runs
            self._engine_free += s.engine_slots - self._engine_slots
            self._engine_slots = s.engine_slots
        self._engine_arrivals += 1
        if self._engine_free > 0 and not self._engine_queue:
            self._engine_free -= 1
        else:
            priority = body.get("priority", 0) if s.engine_policy == "priority" else 0
            order = priority if isinstance(priority, int | float) and not isinstance(priority, bool) else 0
            turn = asyncio.get_running_loop().create_future()
            heapq.heappush(self._engine_queue, (order, self._engine_arrivals, turn))
            self.engine_waiting += 1
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # handed a slot as its client left: pass it on
                    self._engine_release(running=False)
                raise
            finally:
                self.engine_waiting -= 1
        self.engine_running += 1
        return True

    def _engine_release(self, *, running: bool = True) -> None:
        """A call's engine slot, to the first waiting call in the queue's order."""
        if running:
            self.engine_running -= 1
        while self._engine_queue:
            *_, turn = heapq.heappop(self._engine_queue)
            if not turn.done():
                turn.set_result(None)
                return
        self._engine_free += 1

    async def metrics(self, _: Request) -> Response:
        """The engine's queue as vLLM publishes it."""
        s = self.settings
        usage = self.engine_running / s.engine_slots if s.engine_slots else 0.0
        labels = f'{{model_name="{s.models[0]}"}}'
        lines = [
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{labels} {self.engine_waiting}",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{labels} {self.engine_running}",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{labels} {usage}",
        ]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def models(self, _: Request) -> Response:
        data = [
            {"id": m, "object": "model", "created": int(self.started_at), "owned_by": "llmq-mock"}
            for m in self.settings.models
        ]
        return _response({"object": "list", "data": data})

    async def health(self, _: Request) -> Response:
        return _response({"status": "ok"})

    async def stats(self, _: Request) -> Response:
        duplicates = sum(n - 1 for n in self.by_message.values() if n > 1)
        return _response(
            {
                "name": self.name,
                "calls": self.calls,
                "messages": len(self.by_message),
                "duplicates": duplicates,
                "current": self.current,
                "peak_concurrency": self.peak,
                "broken_streams": self.broken_streams,
                "refused": self.refused,
            }
        )

    async def configure(self, request: Request) -> Response:
        try:
            self.settings = _settings_decoder.decode(await request.body())
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _response({"error": str(exc)}, 422)
        return _response(msgspec.to_builtins(self.settings))

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.models),
                Route("/health", self.health),
                Route("/stats", self.stats),
                Route("/metrics", self.metrics),
                Route("/admin/config", self.configure, methods=["POST"]),
            ]
        )
