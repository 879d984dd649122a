"""Streaming through the queue: the official OpenAI SDK with ``stream=True``, resuming with Last-Event-ID,
a backend dying mid-stream, a client going away before dispatch; real Redis, the ingest under uvicorn,
mock backends over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import openai
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.runtime.ops_server import OpsServer
from llmq.stages.ingest import create_app, events
from llmq.stages.ingest.drain import DrainMeter
from llmq.stages.mock_backend import MockSettings
from tests.conftest import eventually
from tests.support.harness import CHAT, Harness
from tests.support.sse import read_events

TOKENS = [f"t{i} " for i in range(8)]


@contextlib.asynccontextmanager
async def served(h: Harness) -> AsyncIterator[str]:
    """The ingest API of the harness's config under uvicorn (its lifespan running): the base URL."""
    server = OpsServer(create_app(h.config, redis=h.redis, keys=h.keys), host="127.0.0.1", port=0, lifespan=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


def streaming(**overrides: Any) -> MockSettings:
    return MockSettings(latency_ms=5, stream_tokens=len(TOKENS), tokens_per_s=200, **overrides)


def contents(chunks: list[str]) -> str:
    out = []
    for data in chunks:
        doc = msgspec.json.decode(data)
        for choice in doc.get("choices", []):
            out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


async def test_the_async_openai_sdk_streams_a_queued_request_with_usage(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a streaming backend behind the queue
    async with Harness(redis, keys, backends={"a": streaming()}) as h, served(h) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        # When the official SDK asks for a stream with usage, on the realtime level
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-LLMQ-Priority": "realtime"},
        )
        chunks = [chunk async for chunk in stream]
        # Then every token comes in order, then a usage chunk, and the message completed once
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "".join(TOKENS)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(TOKENS)
        [mid] = h.mocks["a"].by_message
        status = (await h.wait_terminal([mid]))[mid]
    assert status["status"] == "completed" and h.mocks["a"].calls == 1
    # and the stored result is the whole completion, as a non-streamed call stores it
    assert msgspec.json.decode(status["result"])["choices"][0]["message"]["content"] == "".join(TOKENS)


async def test_the_sync_sdk_streams_and_gets_no_usage_it_did_not_ask_for(redis: aioredis.Redis, keys: Keys) -> None:
    async with Harness(redis, keys, backends={"a": streaming()}) as h, served(h) as url:

        def call() -> list[Any]:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
            return list(stream)

        chunks = await asyncio.to_thread(call)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(TOKENS)
    assert all(c.usage is None for c in chunks)


async def test_curl_reads_the_stream_as_it_comes(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a streaming backend behind the queue, and curl as a shell user runs it (-N: no buffering)
    async with Harness(redis, keys, backends={"a": streaming()}) as h, served(h) as url:
        body = msgspec.json.encode(CHAT | {"model": "m", "stream": True}).decode()
        argv = ["curl", "-sS", "-N", "--max-time", "20", f"{url}/v1/chat/completions", "-d", body]
        argv += ["-H", "Content-Type: application/json", "-H", "X-LLMQ-Priority: realtime"]
        pipe = asyncio.subprocess.PIPE
        curl = await asyncio.create_subprocess_exec(*argv, stdout=pipe, stderr=pipe)
        out, err = await curl.communicate()
    # Then it shows the waiting comment, every chunk in order with the id to resume from, then [DONE]
    assert curl.returncode == 0, err
    lines = out.decode().splitlines()
    assert lines[0].startswith(": ") and "realtime" in lines[0]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: {")]
    assert contents(data) == "".join(TOKENS) and lines[-2:] == ["data: [DONE]", ""]
    assert sum(line.startswith("id: ") for line in lines) == len(data)


async def test_a_client_resumes_with_last_event_id_and_misses_nothing(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a streamed message submitted on the native API, slow enough to read part of it
    slow = MockSettings(latency_ms=5, stream_tokens=len(TOKENS), tokens_per_s=40)
    async with (
        Harness(redis, keys, backends={"a": slow}) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        created = await http.post("/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}})
        assert created.status_code == 202, created.text
        mid = created.json()["id"]
        # When a client reads three chunks and goes away
        first = await read_events(http, f"/api/v1/messages/{mid}/events", stop_after=3)
        last_id = [g for g in first if g[1] == "chunk"][-1][0]
        assert last_id is not None
        # and comes back with Last-Event-ID
        rest = await read_events(http, f"/api/v1/messages/{mid}/events", headers={"Last-Event-ID": last_id})
    # Then it gets what it missed and the rest, each chunk once, in order, then the end
    chunks = [g for g in first + rest if g[1] == "chunk"]
    ids = [g[0] for g in chunks]
    assert len(ids) == len(set(ids))
    assert contents([g[2] for g in chunks]) == "".join(TOKENS)
    assert rest[-1][1] == "end" and msgspec.json.decode(rest[-1][2])["status"] == "completed"


@pytest.mark.parametrize("value", ["abc", "1-", "-1", "1-2-3", "99999999999999999999999-0", "\u0661-0"])
async def test_a_hostile_last_event_id_is_a_422_naming_it(redis: aioredis.Redis, keys: Keys, value: str) -> None:
    async with (
        Harness(redis, keys, backends={"a": streaming()}) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        mid = (await http.post("/api/v1/messages", json={"level": "high", "request": CHAT})).json()["id"]
        response = await http.get(f"/api/v1/messages/{mid}/events", params={"after": value})
    assert response.status_code == 422 and response.json()["field"] == "after", response.text


async def test_a_backend_dying_mid_stream_fails_the_message_with_its_partial_output(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a backend that breaks the connection off after three chunks
    async with Harness(redis, keys, backends={"a": streaming(die_after_chunks=3)}) as h, served(h) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
        got: list[str] = []
        # When a client streams it, then it gets the chunks sent, then an error the SDK raises
        with pytest.raises(openai.APIError, match="broke off the stream after"):
            async for chunk in stream:
                got += [c.delta.content or "" for c in chunk.choices]
        [mid] = h.mocks["a"].by_message
        status = (await h.wait_terminal([mid]))[mid]
    # and the message failed once, with what was answered, never called again to splice a second answer in
    assert status["status"] == "failed" and h.mocks["a"].calls == 1
    assert msgspec.json.decode(status["result"])["choices"][0]["message"]["content"] == "".join(got) == "t0 t1 "


async def test_a_client_gone_before_dispatch_cancels_its_realtime_message(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a backend with one slot, busy with a long call
    busy = MockSettings(latency_ms=1500, stream_tokens=2, tokens_per_s=0)
    config = {"a": {"max_concurrent": 1}}
    async with (
        Harness(redis, keys, backends={"a": busy}, backend_config=config) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        await http.post("/api/v1/messages", json={"level": "low", "request": CHAT})
        await eventually(lambda: _calls(h, 1), what="the slot taken")
        # When a realtime streamed request waits, and its client goes away
        body = CHAT | {"stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-LLMQ-Priority": "realtime"}) as r:
            mid = r.headers["x-llmq-message-id"]
            async for line in r.aiter_lines():
                if line.startswith(":"):
                    break  # the first comment (its position): then the client closes
        # Then the message is cancelled and never sent
        status = (await h.wait_terminal([mid], within=10))[mid]
    assert status["status"] == "cancelled"
    assert mid not in h.mocks["a"].by_message


async def _calls(h: Harness, n: int) -> bool:
    return h.mocks["a"].calls >= n


async def test_legacy_completions_stream_and_embeddings_are_queued_through_the_sdk(
    redis: aioredis.Redis, keys: Keys
) -> None:
    async with Harness(redis, keys, backends={"a": streaming()}) as h, served(h) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        # A legacy completion, whole and streamed
        whole = await client.completions.create(model="m", prompt="say hi")
        streamed = [c async for c in await client.completions.create(model="m", prompt="say hi", stream=True)]
        # and embeddings of two inputs
        vectors = await client.embeddings.create(model="m", input=["a", "bb"])
        # Each reached the backend's own path, through the queue
        by_path = {m: h.mocks["a"].by_message[m] for m in h.mocks["a"].by_message}
        ended = await h.wait_terminal(list(by_path))
    assert whole.choices[0].text == "mock reply from a"
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "".join(TOKENS)
    assert [len(d.embedding) for d in vectors.data] == [8, 8]
    assert len(ended) == 3 and {s["status"] for s in ended.values()} == {"completed"}
    stored = [msgspec.json.decode(s["result"]) for s in ended.values()]
    assert sorted(d["object"] for d in stored) == ["list", "text_completion", "text_completion"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", {"model": "m", "input": "x", "stream": True}, "stream"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/embeddings", {"model": "m", "input": []}, "input"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {}},
            "stream_options",
        ),
    ],
)
async def test_a_request_an_endpoint_cannot_take_is_a_400_naming_the_field(
    redis: aioredis.Redis, keys: Keys, path: str, body: dict[str, Any], param: str
) -> None:
    async with (
        Harness(redis, keys, backends={"a": streaming()}, stages=()) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        response = await http.post(path, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


async def test_an_events_stream_with_nothing_to_say_ends_and_says_to_reconnect(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a message that waits (no stage runs), and streams that may stay idle 1 s
    env = {"LLMQ_SERVER__MAX_POLL_WAIT": "1s"}
    async with (
        Harness(redis, keys, backends={"a": streaming()}, stages=(), env=env) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        mid = (await http.post("/api/v1/messages", json={"level": "low", "request": CHAT})).json()["id"]
        # When a client follows its events
        response = await http.get(f"/api/v1/messages/{mid}/events")
    # Then it hears the status, then, after a quiet second, that it should reconnect: no end, as none came
    body = response.text
    assert body.startswith("retry: 1000\n\n") and 'event: status\ndata: {"status":"queued"}' in body
    assert body.rstrip().endswith("reconnect with Last-Event-ID to go on") and "event: end" not in body


@pytest.mark.parametrize("abort", [True, False])
async def test_a_client_gone_after_dispatch_stops_the_backend_call_only_when_its_level_says(
    redis: aioredis.Redis, keys: Keys, abort: bool
) -> None:
    # Given a backend streaming 100 tokens at 50 a second (two seconds), on a level that aborts (or not)
    slow = MockSettings(latency_ms=0, stream_tokens=100, tokens_per_s=50)
    levels = f"[{{name: realtime, priority: 1, max_wait_time: 5s, max_concurrent: 4, abort_on_disconnect: {abort}}}]"
    env = {"LLMQ_QUEUE__LEVELS": levels}
    async with (
        Harness(redis, keys, backends={"a": slow}, env=env) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        # When its client reads three tokens and goes away
        headers = {"X-LLMQ-Priority": "realtime"}
        async with http.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}, headers=headers) as r:
            mid = r.headers["x-llmq-message-id"]
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: {") and '"content":"t' in line
                if seen == 3:
                    break
        status = (await h.wait_terminal([mid], within=10))[mid]
    answered = msgspec.json.decode(status["result"])["choices"][0]["message"]["content"]
    if abort:
        # Then the backend's stream was broken off at once (its client gone), the message cancelled with
        # what had been generated
        assert status["status"] == "cancelled" and "went away" in status["error"]
        assert answered.startswith("t0 t1 t2 ") and len(answered.split()) < 50
        assert h.mocks["a"].broken_streams == 1
    else:
        # Then the generation ran to its end and is kept
        assert status["status"] == "completed" and len(answered.split()) == 100
        assert h.mocks["a"].broken_streams == 0


async def test_a_waiting_stream_is_told_its_position_and_wait_as_the_level_drains(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a backend with one slot answering in 400 ms, and ten low messages queued first (four seconds)
    busy = MockSettings(latency_ms=400, stream_tokens=2, tokens_per_s=0)
    async with (
        Harness(redis, keys, backends={"a": busy}, backend_config={"a": {"max_concurrent": 1}}) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        for _ in range(10):
            await http.post("/api/v1/messages", json={"level": "low", "request": CHAT})
        # When a streamed request joins the level behind them
        headers = {"X-LLMQ-Priority": "low"}
        comments: list[str] = []
        native: list[Any] = []
        async with http.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}, headers=headers) as r:
            mid = r.headers["x-llmq-message-id"]
            watch = asyncio.create_task(read_events(http, f"/api/v1/messages/{mid}/events", got=native))
            async for line in r.aiter_lines():
                if line.startswith(": queued"):
                    comments.append(line)
                if line.startswith("data: {"):
                    break
        await watch
    # Then its comments count its place down as the messages before it leave, and, once the level has been
    # seen draining, say about how long it has left
    places = [int(c.split("position ")[1].split(",")[0]) for c in comments]
    assert places[0] >= 9 and places == sorted(places, reverse=True) and places[-1] < places[0]
    assert any(", about " in c for c in comments[1:])
    # and the native events carry the same as fields
    queued = [msgspec.json.decode(data) for _, name, data in native if name == "status" and "position" in data]
    assert queued and all(q["status"] == "queued" for q in queued)
    assert any("eta_s" in q and q["eta_s"] > 0 for q in queued)


async def test_a_stream_cut_for_reading_too_slowly_leaves_the_call_running(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a client that falls behind its stream (MAX_BEHIND of 1 stands for 10,000 events), on a level that
    # stops the backend call of a client that goes away
    monkeypatch.setattr(events, "MAX_BEHIND", 1)
    slow = MockSettings(latency_ms=0, stream_tokens=60, tokens_per_s=50)
    levels = "[{name: realtime, priority: 1, max_wait_time: 5s, max_concurrent: 4, abort_on_disconnect: true}]"
    async with (
        Harness(redis, keys, backends={"a": slow}, env={"LLMQ_QUEUE__LEVELS": levels}) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        headers = {"X-LLMQ-Priority": "realtime"}
        async with http.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}, headers=headers) as r:
            mid = r.headers["x-llmq-message-id"]
            body = "".join([line async for line in r.aiter_lines()])
        status = (await h.wait_terminal([mid], within=10))[mid]
    # When the server cuts it, telling where the whole answer will be, then the answer is whole there: the cut
    # was no client going away (it aborted the call)
    assert "the stream was cut: the whole answer is at GET /api/v1/messages/" in body
    answer = msgspec.json.decode(status["result"])["choices"][0]["message"]["content"]
    assert status["status"] == "completed" and len(answer.split()) == 60


async def test_a_position_is_never_told_past_the_depth_a_message_came_with(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a meter that read the level's count once, before a quiet spell in which 100 messages left
    stream = keys.level("low")
    await redis.xgroup_create(stream, Group.SCHEDULE.value, id="0", mkstream=True)
    meter = DrainMeter(redis, keys, ["low"])

    async def pass_through(n: int) -> None:
        await asyncio.gather(*(redis.xadd(stream, {"m": b"x"}) for _ in range(n)))
        for _, entries in await redis.xreadgroup(Group.SCHEDULE.value, "c", {stream: ">"}, count=n):
            await redis.xack(stream, Group.SCHEDULE.value, *[entry_id for entry_id, _ in entries])

    await pass_through(1)
    await meter._sample()
    await pass_through(100)
    # When a message comes with 3 before it (what the submit script keeps: its depth and the count then)
    group = next(g for g in await redis.xinfo_groups(stream) if g["name"] in (b"schedule", "schedule"))
    left_mark = int(group["entries-read"]) - int(group["pending"])
    # Then it is told 3 before it, not 103: the meter's count is older than the message's (it was 104)
    assert meter.position("low", 3, left_mark)[0] == 3
    # and, once the meter reads again, the count of what left since
    await meter._sample()
    await pass_through(2)
    await meter._sample()
    assert meter.position("low", 3, left_mark)[0] == 1


def test_a_level_that_stopped_draining_has_no_estimate_rather_than_an_endless_one() -> None:
    # Given a level seen draining, then stalled until its moving rate decayed to almost nothing
    meter = DrainMeter(aioredis.Redis(), Keys("{x}"), ["low"])
    meter._sampled_at = time.monotonic()
    meter.rate["low"] = 10.0
    assert meter.wait_s("low", 9) == 1.0
    meter.rate["low"] = 5e-324  # 0.7 ** n of the rate after half an hour without a message leaving
    # Then the wait is unknown (it was "about inf s", and eta_s null)
    assert meter.wait_s("low", 9) is None


async def test_submit_status_and_a_full_levels_retry_after_follow_the_measured_drain(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a level of at most 6 waiting, drained by one backend slot answering in 1.5 s (0.67 a second)
    levels = "[{name: low, priority: 1, max_wait_time: 60s, max_concurrent: 1, max_size: 6}]"
    config = {"a": {"max_concurrent": 1}}
    busy = MockSettings(latency_ms=1500)
    async with (
        Harness(redis, keys, backends={"a": busy}, backend_config=config, env={"LLMQ_QUEUE__LEVELS": levels}) as h,
        served(h) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        ids = [(await http.post("/api/v1/messages", json={"level": "low", "request": CHAT})).json()["id"]]
        ids += [
            r["id"]
            for r in (await http.post("/api/v1/messages/batch", json=[{"level": "low", "request": CHAT}] * 5)).json()
        ]

        # When a client watches the last one until the level has been seen draining
        async def estimated() -> bool:
            view = (await http.get(f"/api/v1/messages/{ids[-1]}")).json()
            return view["status"] == "queued" and view["eta_s"] is not None

        await eventually(estimated, within=10, interval=0.2, what="an estimate of the wait")
        view = (await http.get(f"/api/v1/messages/{ids[-1]}")).json()
        # Then its status says how many wait before it and about how long it has left
        assert 0 < view["position"] < 5 and view["eta_s"] >= view["position"]
        # and so does a new message's 202, and, once the level is full, the 429 says when to come back
        accepted = (await http.post("/api/v1/messages", json={"level": "low", "request": CHAT})).json()
        assert accepted["status"] == "queued" and accepted["eta_s"] > 1
        for _ in range(6):
            full = await http.post("/api/v1/messages", json={"level": "low", "request": CHAT})
            if full.status_code == 429:
                break
        assert full.status_code == 429 and 1 <= int(full.headers["Retry-After"]) <= 60


def test_a_full_levels_retry_after_is_when_it_will_have_room_at_its_drain_rate() -> None:
    meter = DrainMeter(aioredis.Redis(), Keys("{x}"), ["low"])
    assert meter.retry_after_s("low", 5) == 1  # not seen draining: a second, as before
    meter._sampled_at = time.monotonic()
    meter.rate["low"] = 0.4
    assert meter.retry_after_s("low", 1) == 3 and meter.retry_after_s("low", 5) == 13
    assert meter.retry_after_s("low", 1000) == 60  # at most a minute
    meter.rate["low"] = 50.0
    assert meter.retry_after_s("low", 1) == 1
