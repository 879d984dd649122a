"""Streaming at its edges, each a defect a hostile review reproduced: chunks missed by a client resuming beside
another, a hostile Last-Event-ID, backends that stream errors, whole answers, line separators, lone
surrogates or UTF-7, tool calls, the echo backend, usage counted by llmq, a replay, an idempotent repeat."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import openai
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import llmq.stages.ingest.events as events_module
from llmq.pipeline.keys import Keys
from llmq.pipeline.runtime.ops_server import OpsServer
from llmq.stages.ingest.events import EventHub
from llmq.stages.mock_backend import MockSettings
from tests.conftest import eventually
from tests.support.harness import CHAT, Harness
from tests.support.sse import read_events
from tests.test_streaming import TOKENS, served, streaming

# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def chunk(content: str | None = None, *, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(delta)
    if content is not None:
        d["content"] = content
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}],
    }


@contextlib.asynccontextmanager
async def raw_backend(
    make: Callable[[dict[str, Any]], Response], calls: list[dict[str, Any]] | None = None
) -> AsyncIterator[str]:
    """A backend answering every POST /v1/chat/completions with ``make(body)``: its base URL."""

    async def handler(request: Request) -> Response:
        body = msgspec.json.decode(await request.body())
        if calls is not None:
            calls.append(body)
        return make(body)

    app = Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"])])
    server = OpsServer(app, host="127.0.0.1", port=0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/v1"
    finally:
        await server.stop()


def sse_body(events: list[bytes], *, media_type: str = "text/event-stream", gap: float = 0.0) -> Response:
    async def gen() -> AsyncIterator[bytes]:
        for e in events:
            if gap:
                await asyncio.sleep(gap)
            yield e

    return StreamingResponse(gen(), media_type=media_type)


def harness_for(redis: aioredis.Redis, keys: Keys, url: str, **env: str) -> Harness:
    return Harness(
        redis,
        keys,
        backends={},
        env={"LLMQ_BACKENDS": f'[{{name: raw, url: "{url}", max_concurrent: 8}}]', **env},
    )


# ---------------------------------------------------------------------------------------------------------
# 1. A Last-Event-ID that passes validation but that Redis refuses breaks the hub for every client
# ---------------------------------------------------------------------------------------------------------


async def test_one_clients_out_of_range_last_event_id_starves_every_other_stream(
    redis: aioredis.Redis, keys: Keys
) -> None:
    slow = MockSettings(latency_ms=5, stream_tokens=len(TOKENS), tokens_per_s=8)  # ~1 s of chunks
    async with (
        Harness(redis, keys, backends={"a": slow}) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        # Given any message, and a client that follows it from an id that matches <ms>-<seq> (20 digits each
        # at most) but is past what a stream id can be (2^64 - 1)
        body = {"level": "low", "request": CHAT | {"stream": True}}
        other = (await http.post("/api/v1/messages", json=body)).json()["id"]
        hostile = asyncio.create_task(
            http.get(f"/api/v1/messages/{other}/events", headers={"Last-Event-ID": "99999999999999999999-0"})
        )
        await asyncio.sleep(0.3)
        # When another client streams its own request through the OpenAI SDK on the same ingest
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        hostile.cancel()
    # Then it gets its tokens (it gets [DONE] with no token at all: a silent empty answer)
    assert text == "".join(TOKENS)


# ---------------------------------------------------------------------------------------------------------
# 2. A follower that joins while the hub's XREAD (from a later position) is answered skips entries
# ---------------------------------------------------------------------------------------------------------


async def test_a_follower_joining_while_a_read_is_answered_gets_every_entry(redis: aioredis.Redis, keys: Keys) -> None:
    key = keys.events("m1")
    for i in range(1, 6):
        await redis.xadd(key, {b"c": b"%d" % i}, id=f"1-{i}")
    hub = EventHub(redis)
    # The reply to the hub's XREAD is on its way (a chunk came) when a second client resumes from the start:
    # reproduced exactly by joining right after Redis answered, before the hub handles the answer.
    reader = hub._reader = redis.client()
    real_xread = reader.xread
    joined: list[Any] = []

    async def xread_then_join(*args: Any, **kwargs: Any) -> Any:
        reply = await real_xread(*args, **kwargs)
        if reply and not joined:
            joined.append(hub.follow(key, "0-0"))
        return reply

    reader.xread = xread_then_join  # type: ignore[method-assign]
    hub.start()
    try:
        live = hub.follow(key, "1-5")  # a client at the head of the stream
        await asyncio.sleep(0.2)  # the hub's XREAD is blocked from 1-5
        await redis.xadd(key, {b"c": b"6"}, id="1-6")
        await asyncio.sleep(0.5)
        late = joined[0]
        got = []
        while (event := await late.next(0.5)) is not None:
            got.append(event[0])
        assert (await live.next(0.1)) is not None
    finally:
        await hub.close()
    assert got == ["1-1", "1-2", "1-3", "1-4", "1-5", "1-6"]


async def test_resuming_clients_under_real_timing_miss_no_entry(redis: aioredis.Redis, keys: Keys) -> None:
    """The same without any patching: one client live on a fast stream, others resuming from earlier ids."""
    key = keys.events("m2")
    total = 1500
    hub = EventHub(redis)
    hub.start()
    losses: list[tuple[str, int]] = []
    try:
        live = hub.follow(key, "0-0")

        async def produce() -> None:
            for i in range(1, total + 1):
                await redis.xadd(key, {b"c": b"x"}, id=f"1-{i}")
                await asyncio.sleep(0.001)

        async def resume(after: int) -> None:
            follower = hub.follow(key, f"1-{after}")
            expected = after + 1
            try:
                while expected <= min(after + 40, total):
                    event = await follower.next(3)
                    assert event is not None
                    seq = int(event[0].split("-")[1])
                    if seq != expected:
                        losses.append((f"resumed after 1-{after}: got 1-{seq}, expected", expected))
                        return
                    expected += 1
            finally:
                hub.leave(follower)

        producer = asyncio.create_task(produce())
        resumers = []
        while not producer.done():
            await asyncio.sleep(0.01)
            head = live.last
            n = int(head.split("-")[1]) if head != "0-0" else 0
            if n > 20:
                resumers.append(asyncio.create_task(resume(n - 20)))
            while not live.queue.empty():
                live.queue.get_nowait()
        await asyncio.gather(*resumers)
    finally:
        await hub.close()
    assert losses == [], f"{len(losses)} of {len(resumers)} resumes skipped entries, e.g. {losses[:3]}"


# ---------------------------------------------------------------------------------------------------------
# 3. The echo backend answers a streamed request with an empty stream
# ---------------------------------------------------------------------------------------------------------


async def test_a_streamed_request_on_the_echo_backend_gets_its_answer(redis: aioredis.Redis, keys: Keys) -> None:
    env = {"LLMQ_BACKENDS": '[{name: e, url: "echo://local/v1", max_concurrent: 8}]'}
    async with Harness(redis, keys, backends={}, env=env) as h, served(h) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        whole = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert whole.choices[0].message.content
    assert text == whole.choices[0].message.content


# ---------------------------------------------------------------------------------------------------------
# 4. Tool calls (and anything but content) streamed are lost from the stored completion
# ---------------------------------------------------------------------------------------------------------


async def test_a_streamed_tool_call_is_stored_as_a_non_streamed_one_would_be(redis: aioredis.Redis, keys: Keys) -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    chunks = [
        chunk(role="assistant", content=None),
        chunk(tool_calls=[call]),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city":'}}]),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
        chunk(finish="tool_calls"),
    ]
    events = [b"data: " + msgspec.json.encode(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
    async with raw_backend(lambda _: sse_body(events)) as backend, harness_for(redis, keys, backend) as h:
        created = await h.http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
        mid = created.json()["id"]
        status = (await h.wait_terminal([mid]))[mid]
    assert status["status"] == "completed"
    message = msgspec.json.decode(status["result"])["choices"][0]["message"]
    assert message.get("tool_calls"), f"the stored answer lost the tool call: {message}"


# ---------------------------------------------------------------------------------------------------------
# 5. A backend's error event mid-stream (HTTP 200) is recorded as a completion
# ---------------------------------------------------------------------------------------------------------


async def test_an_error_the_backend_streams_fails_the_message(redis: aioredis.Redis, keys: Keys) -> None:
    error = {"error": {"message": "CUDA out of memory", "type": "server_error", "code": 500}}
    events = [
        b"data: " + msgspec.json.encode(chunk("Hello")) + b"\n\n",
        b"data: " + msgspec.json.encode(error) + b"\n\n",
        b"data: [DONE]\n\n",
    ]
    async with raw_backend(lambda _: sse_body(events)) as backend, harness_for(redis, keys, backend) as h:
        created = await h.http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
        mid = created.json()["id"]
        status = (await h.wait_terminal([mid]))[mid]
    assert status["status"] == "failed", status


# ---------------------------------------------------------------------------------------------------------
# 6. A backend that answers a stream request with a whole JSON completion: thrown away, called again and again
# ---------------------------------------------------------------------------------------------------------


async def test_a_backend_answering_whole_json_to_a_stream_is_called_once(redis: aioredis.Redis, keys: Keys) -> None:
    calls: list[dict[str, Any]] = []
    whole = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    }

    def make(_: dict[str, Any]) -> Response:
        return Response(msgspec.json.encode(whole), media_type="application/json")

    async with raw_backend(make, calls) as backend, harness_for(redis, keys, backend) as h:
        created = await h.http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
        mid = created.json()["id"]
        status = (await h.wait_terminal([mid]))[mid]
    assert len(calls) == 1, f"{len(calls)} calls, ended {status['status']}: {status.get('error')}"


# ---------------------------------------------------------------------------------------------------------
# 7. A lone surrogate in a streamed answer
# ---------------------------------------------------------------------------------------------------------


async def test_an_escaped_lone_surrogate_in_a_stream_completes_as_in_a_whole_answer(
    redis: aioredis.Redis, keys: Keys
) -> None:
    calls: list[dict[str, Any]] = []
    events = [
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        b'"delta":{"role":"assistant","content":"\\ud83d"},"finish_reason":null}]}\n\n',
        b"data: " + msgspec.json.encode(chunk("!", finish="stop")) + b"\n\n",
        b"data: [DONE]\n\n",
    ]
    async with raw_backend(lambda _: sse_body(events), calls) as backend, harness_for(redis, keys, backend) as h:
        created = await h.http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
        mid = created.json()["id"]
        status = (await h.wait_terminal([mid]))[mid]
    assert (status["status"], len(calls)) == ("completed", 1), (len(calls), status)


async def test_a_stream_in_utf7_is_read_once_and_ends(redis: aioredis.Redis, keys: Keys) -> None:
    calls: list[dict[str, Any]] = []
    events = [b'data: {"choices":[{"index":0,"delta":{"content":"+2AA-"}}]}\n\n', b"data: [DONE]\n\n"]

    def make(_: dict[str, Any]) -> Response:
        return sse_body(events, media_type="text/event-stream; charset=utf-7")

    env = {"LLMQ_QUEUE__WORKER__MAX_DELIVERIES": "3", "LLMQ_QUEUE__WORKER__CLAIM_TIMEOUT": "1s"}
    async with raw_backend(make, calls) as backend, harness_for(redis, keys, backend, **env) as h:
        created = await h.http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
        mid = created.json()["id"]
        status = (await h.wait_terminal([mid], within=20))[mid]
    assert len(calls) == 1, f"{len(calls)} calls, ended {status['status']}: {status.get('error')}"


# ---------------------------------------------------------------------------------------------------------
# 9. The usage chunk llmq makes up (a backend that sends none) is not a chat.completion.chunk the SDK reads
# ---------------------------------------------------------------------------------------------------------


async def test_the_made_up_usage_chunk_is_a_whole_chunk(redis: aioredis.Redis, keys: Keys) -> None:
    answer = (chunk(role="assistant", content=""), chunk("a"), chunk("b"), chunk(finish="stop"))
    events = [b"data: " + msgspec.json.encode(c) + b"\n\n" for c in answer]
    events.append(b"data: [DONE]\n\n")
    async with (
        raw_backend(lambda _: sse_body(events)) as backend,
        harness_for(redis, keys, backend) as h,
        served(h) as url,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.usage is not None
    assert (last.id, last.model) == ("chatcmpl-x", "m"), last
    assert last.usage.completion_tokens == 2, last.usage


# ---------------------------------------------------------------------------------------------------------
# 10. (control) followers are dropped when clients go away
# ---------------------------------------------------------------------------------------------------------


async def test_followers_are_dropped_when_clients_go_away(redis: aioredis.Redis, keys: Keys, monkeypatch: Any) -> None:
    hubs: list[EventHub] = []
    real_init = EventHub.__init__

    def init(self: EventHub, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        hubs.append(self)

    monkeypatch.setattr(EventHub, "__init__", init)
    slow = MockSettings(latency_ms=5, stream_tokens=40, tokens_per_s=10)
    async with Harness(redis, keys, backends={"a": slow}) as h, served(h) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hello"}], stream=True
            )
            n = 0
            async for _c in stream:
                n += 1
                if n == 3:
                    break
            await stream.close()
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            mid = (
                await http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
            ).json()["id"]
            async with http.stream("GET", f"/api/v1/messages/{mid}/events") as r:
                async for line in r.aiter_lines():
                    if line.startswith("event: chunk"):
                        break
        hub = [x for x in hubs if x._task is not None][-1]
        for _ in range(50):
            if hub.following == 0:
                break
            await asyncio.sleep(0.1)
        assert hub.following == 0, hub._followers


# ---------------------------------------------------------------------------------------------------------
# 11. (control) the events streams of messages ended before dispatch expire
# ---------------------------------------------------------------------------------------------------------


async def test_events_of_streamed_messages_ended_before_dispatch_expire(redis: aioredis.Redis, keys: Keys) -> None:
    busy = MockSettings(latency_ms=3000, stream_tokens=2, tokens_per_s=0)
    async with Harness(redis, keys, backends={"a": busy}, backend_config={"a": {"max_concurrent": 1}}) as h:
        await h.submit("high")
        await asyncio.sleep(0.3)
        expiring = await h.submit("low", deadline_ms=300, request=CHAT | {"stream": True})
        cancelled = await h.submit("low", request=CHAT | {"stream": True})
        assert (await h.http.delete(f"/api/v1/messages/{cancelled}")).status_code == 200
        ended = await h.wait_terminal([expiring, cancelled], within=20)
        await asyncio.sleep(0.5)
        ttls = {m: await redis.ttl(keys.events(m)) for m in (expiring, cancelled)}
        kinds = {m: await redis.xrange(keys.events(m)) for m in (expiring, cancelled)}
    assert {m: s["status"] for m, s in ended.items()} == {expiring: "expired", cancelled: "cancelled"}
    assert all(t > 0 or t == -2 for t in ttls.values()), (ttls, kinds)  # -2: no key (nothing to leak)


# ---------------------------------------------------------------------------------------------------------
# 2b. The hub race at the API: a client resumes with Last-Event-ID while another client reads the same stream
# ---------------------------------------------------------------------------------------------------------


async def test_a_client_resuming_beside_a_live_reader_misses_nothing(redis: aioredis.Redis, keys: Keys) -> None:

    fast = MockSettings(latency_ms=5, stream_tokens=1500, tokens_per_s=1000)
    gaps = []
    async with (
        Harness(redis, keys, backends={"a": fast}) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        for _ in range(10):
            created = await http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
            mid = created.json()["id"]
            path = f"/api/v1/messages/{mid}/events"
            # One client reads the stream live
            live_got: list[Any] = []
            live = asyncio.create_task(read_events(http, path))
            # (its progress is seen in the events stream itself: wait for 40 chunks)
            key = keys.events(mid)
            await eventually(lambda k=key: _longer_than(redis, k, 40), interval=0.005, what="40 chunks")
            ids = [e[0].decode() for e in await redis.xrange(keys.events(mid))]
            # another resumes 30 chunks back (a reconnect: it got up to there)
            resumed = await read_events(http, path, headers={"Last-Event-ID": ids[9]})
            live_got = await live
            got = [g[0] for g in resumed if g[1] == "chunk"]
            want = [g[0] for g in live_got if g[1] == "chunk"]
            want = want[want.index(ids[9]) + 1 :]
            if got != want:
                gaps.append((len(want) - len(got), got[:2], want[:2]))
    assert gaps == [], f"resumed clients missed chunks (missing, got, want): {gaps}"


# ---------------------------------------------------------------------------------------------------------
# 12. A raw U+2028 / U+0085 inside a chunk's JSON string (legal JSON) is read as a line break
# ---------------------------------------------------------------------------------------------------------


async def test_a_line_separator_inside_a_chunk_is_part_of_the_answer(redis: aioredis.Redis, keys: Keys) -> None:
    calls: list[dict[str, Any]] = []
    text = "one\u2028two\x85three"
    answer = (chunk(role="assistant", content=""), chunk("ok "), chunk(text), chunk(finish="stop"))
    # as pydantic-core (vLLM) or json.dumps(ensure_ascii=False) writes it: non-ASCII characters raw
    events = [b"data: " + msgspec.json.encode(c) + b"\n\n" for c in answer] + [b"data: [DONE]\n\n"]
    assert "\u2028".encode() in events[2] and msgspec.json.decode(events[2][6:])  # valid JSON, one SSE line
    async with raw_backend(lambda _: sse_body(events), calls) as backend, harness_for(redis, keys, backend) as h:
        created = await h.http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
        mid = created.json()["id"]
        status = (await h.wait_terminal([mid]))[mid]
    assert status["status"] == "completed", status.get("error")
    assert msgspec.json.decode(status["result"])["choices"][0]["message"]["content"] == "ok " + text


def test_the_stored_completion_keeps_reasoning_and_refusals() -> None:
    from llmq.pipeline.chunks import Assembler

    a = Assembler()
    a.add(chunk(role="assistant", reasoning_content="think"))
    a.add(chunk(refusal="no"))
    a.add(chunk(finish="stop"))
    message = a.completion()["choices"][0]["message"]
    assert message.get("reasoning_content") == "think" and message.get("refusal") == "no", message


# ---------------------------------------------------------------------------------------------------------
# 13. A streamed message replayed from the dead letters after its status hash expired (archived_retention:
#     a minute) is no longer followed as streamed: its chunks never reach /events
# ---------------------------------------------------------------------------------------------------------


async def test_a_streamed_message_replayed_after_its_hash_expired_streams_its_chunks(
    redis: aioredis.Redis, keys: Keys
) -> None:

    env = {"LLMQ_QUEUE__RETRY__MAX_RETRIES": "0"}
    async with (
        Harness(redis, keys, backends={"a": MockSettings(fail_rate=1.0, fail_status=500)}, env=env) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        # Given a streamed message that ended dead (its backend failed), a dead letter
        created = await http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
        mid = created.json()["id"]
        assert (await h.wait_terminal([mid]))[mid]["status"] == "dead"
        listed = (await http.get("/api/v1/dlq")).json()
        [letter] = listed["items"] if isinstance(listed, dict) else listed
        # its status hash gone, as it is a minute after it was archived (queue.archived_retention)
        await redis.delete(keys.msg(mid))
        # When the backend is fixed and the dead letter replayed
        h.mocks["a"].settings = streaming()
        letter_id = letter.get("entry_id") or letter.get("id")
        replay = await http.post(f"/api/v1/dlq/{letter_id}/replay")
        assert replay.status_code == 200, replay.text
        # Then a client following it gets its chunks
        got = await read_events(http, f"/api/v1/messages/{mid}/events")
        assert (await h.wait_terminal([mid]))[mid]["status"] == "completed"
        streamed = await redis.xlen(keys.events(mid))
    assert streamed > 0
    assert [g[1] for g in got].count("chunk") > 0, got


# ---------------------------------------------------------------------------------------------------------
# 14. A repeat of a streamed request (same Idempotency-Key) that goes away cancels the message the first
#     client is still reading
# ---------------------------------------------------------------------------------------------------------


async def test_a_repeat_going_away_does_not_cancel_the_first_clients_stream(redis: aioredis.Redis, keys: Keys) -> None:
    busy = MockSettings(latency_ms=1500, stream_tokens=2, tokens_per_s=0)
    async with (
        Harness(redis, keys, backends={"a": busy}, backend_config={"a": {"max_concurrent": 1}}) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        await http.post("/api/v1/messages", json={"level": "low", "request": CHAT})
        await eventually(lambda: _called(h), what="the slot taken")
        body = CHAT | {"stream": True}
        headers = {"X-LLMQ-Priority": "realtime", "Idempotency-Key": "k1"}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as first:
            mid = first.headers["x-llmq-message-id"]
            lines = first.aiter_lines()
            assert (await anext(lines)).startswith(":")
            # the same request again (a retry by a proxy, a second tab), which goes away at once
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as again:
                assert again.headers["x-llmq-message-id"] == mid
                async for line in again.aiter_lines():
                    if line.startswith(":"):
                        break
            # the first client reads on
            rest = [line async for line in lines]
        status = (await h.wait_terminal([mid], within=10))[mid]
    assert status["status"] == "completed", (status["status"], [x for x in rest if x.startswith("data")])


async def _longer_than(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.xlen(key)) >= n


async def _called(h: Harness) -> bool:
    return h.mocks["a"].calls >= 1


async def test_a_follower_that_falls_too_far_behind_is_cut_off_and_keeps_what_it_had(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stream of 20 events and a hub that lets a follower fall 5 behind
    monkeypatch.setattr(events_module, "MAX_BEHIND", 5)
    key = keys.events("slow")
    for i in range(1, 21):
        await redis.xadd(key, {b"c": b"x"}, id=f"1-{i}")
    hub = EventHub(redis)
    hub.start()
    try:
        # When a follower reads nothing
        slow = hub.follow(key, "0-0")

        async def overrun() -> bool:
            return slow.overrun

        await eventually(overrun, what="the follower cut off")
        got = [await slow.next(0.1) for _ in range(6)]
    finally:
        await hub.close()
    # Then it is cut off after 5: it keeps those (its client resumes after the last), and the hub drops it
    assert [g[0] for g in got[:5] if g is not None] == [f"1-{i}" for i in range(1, 6)]
    assert got[5] is None and hub.following == 0


async def test_a_message_an_echo_dispatcher_finds_streamed_before_fails_with_it_and_does_not_hang(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a streamed message whose events stream holds another call's chunk (its dispatcher died)
    env = {"LLMQ_BACKENDS": '[{name: e, url: "echo://local/v1", max_concurrent: 8}]'}
    async with Harness(redis, keys, backends={}, env=env, stages=()) as h:
        mid = (
            await h.http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
        ).json()["id"]
    await redis.xadd(keys.events(mid), {b"w": b"another-call"}, id="1-0")
    await redis.xadd(keys.events(mid), {b"c": msgspec.json.encode(chunk("half "))}, id="1-1")
    # When an echo dispatcher takes it
    async with Harness(redis, keys, backends={}, env=env) as h:
        status = (await h.wait_terminal([mid], within=10))[mid]
    # Then it fails with what was streamed, never a second answer spliced in, nor left pending
    assert status["status"] == "failed" and "broke off" in status["error"]
    assert msgspec.json.decode(status["result"])["choices"][0]["message"]["content"] == "half "
