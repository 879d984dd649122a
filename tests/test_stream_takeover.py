"""A dispatcher paused (SIGSTOP: a GC pause, a frozen VM) before its first chunk is taken over by another,
which calls the backend again; resumed, the first one must not stream into the same events stream: a
client sees one generation, the one stored, and nothing is written to the stream after its end."""

from __future__ import annotations

import asyncio
import signal

import httpx
import msgspec
import pytest

from llmq.pipeline.config import RedisConfig
from llmq.pipeline.keys import Keys
from llmq.pipeline.redis import make_redis
from tests.conftest import eventually, free_port
from tests.support.harness import CHAT
from tests.support.procs import llmq_stage, stop_all
from tests.support.sse import Event, read_events


async def _stats(http: httpx.AsyncClient, port: int) -> dict[str, int]:
    stats: dict[str, int] = (await http.get(f"http://127.0.0.1:{port}/stats")).json()
    return stats


@pytest.mark.timeout(120)
async def test_a_paused_dispatcher_taken_over_does_not_splice_two_generations(stage_env: dict[str, str]) -> None:
    mock_port, api = free_port(), free_port()
    env = stage_env | {
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_SERVER__PORT": str(api),
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock_port}/v1", max_concurrent: 4}}]',
    }
    mock = llmq_stage(env, "run", "mock-backend", "--port", str(mock_port))
    procs = [mock, llmq_stage(env, "run", "ingest")]
    procs += [llmq_stage(env, "run", s, "--port", "0") for s in ("schedule", "retry")]
    first = llmq_stage(env, "run", "dispatch", "--port", "0")
    procs.append(first)
    keys = Keys(env["LLMQ_KEY_PREFIX"])
    redis = make_redis(RedisConfig(url=env["LLMQ_REDIS_URL"]))
    try:
        for proc in procs[2:]:
            proc.wait_for_log("stage started", timeout=30)
        procs[1].wait_for_log_text("ingest listening", timeout=30)
        mock.wait_for_log_text("mock backend listening", timeout=30)
        async with httpx.AsyncClient(timeout=60) as http:
            # Given a backend slow to its first token (1.5 s), then 10 tokens a second
            slow = {"latency_ms": 1500, "stream_tokens": 40, "tokens_per_s": 10}
            (await http.post(f"http://127.0.0.1:{mock_port}/admin/config", json=slow)).raise_for_status()
            created = await http.post(
                f"http://127.0.0.1:{api}/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}}
            )
            mid = created.json()["id"]
            got: list[Event] = []
            reading = asyncio.create_task(
                read_events(http, f"http://127.0.0.1:{api}/api/v1/messages/{mid}/events", got=got)
            )

            async def called(n: int) -> bool:
                return (await _stats(http, mock_port))["calls"] >= n

            await eventually(lambda: called(1), within=30, what="the first dispatcher's call")
            # When the first dispatcher is paused before its first chunk, another takes the entry over and
            # calls again (nothing was streamed), and the first one wakes up
            first.signal(signal.SIGSTOP)
            procs.append(llmq_stage(env, "run", "dispatch", "--port", "0"))
            await eventually(lambda: called(2), within=60, interval=0.05, what="the call made again")
            first.signal(signal.SIGCONT)
            await asyncio.wait_for(reading, 60)
            status = (await http.get(f"http://127.0.0.1:{api}/api/v1/messages/{mid}")).json()

            async def calls_over() -> bool:
                return (await _stats(http, mock_port))["current"] == 0

            await eventually(calls_over, within=30, what="both calls to end")
            entries = await redis.xrange(keys.events(mid))
            ttl = await redis.ttl(keys.events(mid))
            hash_ttl = await redis.ttl(keys.msg(mid))
    finally:
        first.signal(signal.SIGCONT)
        stop_all(procs)
        await redis.aclose()
    # Then the client saw one generation (t0 t1 ... in order), and it is what was stored
    seen = "".join(
        c.get("delta", {}).get("content") or ""
        for g in got
        if g[1] == "chunk"
        for c in msgspec.json.decode(g[2])["choices"]
    )
    words = seen.split()
    assert words == [f"t{i}" for i in range(len(words))], seen
    # (completed, or failed with it when the writer's call ran past scheduler.timeout, its pause counted)
    assert status["status"] in ("completed", "failed"), status
    assert status["result"]["choices"][0]["message"]["content"] == seen
    # and nothing was written to the events stream after its end: its TTL is the status hash's
    kinds = [next(iter(fields)).decode() for _, fields in entries]
    assert kinds[-1] == "end" and ttl <= hash_ttl + 5, (kinds[-3:], ttl, hash_ttl)
