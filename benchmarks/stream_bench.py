"""Streaming through the queue at idle: what llmq adds to a streamed call's time to first token, and to a
non-streamed OpenAI-facade round trip, each beside the same call made directly to the same backend in the
same run.

The backend is the mock (a separate process) answering at once: 8 chunks with no pause between them, so
its own time to first token is a few milliseconds and what llmq adds is what the figures show. The stages
run as processes (ingest, schedule, dispatch, retry) on the machine's Redis (or an embedded one); calls are
sequential, on the realtime level, through one keep-alive HTTP client, alternating direct and through
llmq so drifts of the machine hit both.

    .venv/bin/python -m benchmarks.stream_bench [--redis-url URL] [--n 300]

Prints figures and writes JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import httpx
import redis.asyncio as aioredis

from benchmarks._procs import drop_prefix, free_port, machine, pct, redis_url, run_env, stages, write_result
from llmq.pipeline.keys import Keys

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
WARM_UP = 20


async def first_token_ms(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> float:
    """Milliseconds from sending a streamed request to its first chunk with content."""
    started = time.perf_counter()
    async with http.stream("POST", url, json=CHAT | {"stream": True}, headers=headers) as response:
        response.raise_for_status()
        first = None
        async for line in response.aiter_lines():
            if first is None and line.startswith("data:") and '"content":"t' in line:
                first = (time.perf_counter() - started) * 1000
    assert first is not None, "no content chunk"
    return first


ROUND_TRIP_IDS: list[str] = []
"""The message ids of the round trips through llmq, for the hop-by-hop breakdown."""


async def round_trip_ms(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    response = await http.post(url, json=CHAT, headers=headers)
    response.raise_for_status()
    if "x-llmq-message-id" in response.headers:
        ROUND_TRIP_IDS.append(response.headers["x-llmq-message-id"])
    return (time.perf_counter() - started) * 1000


async def hops(redis: aioredis.Redis, keys: Keys, ids: list[str]) -> dict[str, Any]:
    """Where a round trip's time goes, from each message's status hash (p50 ms): queued until admitted
    (ingest's submit → the scheduler's admission), admitted until the dispatcher began it, and began until
    its outcome was committed (the HTTP call and the commit)."""
    spans: dict[str, list[float]] = {"submit_to_admitted": [], "admitted_to_began": [], "began_to_finished": []}
    for mid in ids:
        h = {k.decode(): float(v) for k, v in (await redis.hgetall(keys.msg(mid))).items() if k.endswith(b"_at")}
        if {"enqueued_at", "scheduled_at", "started_at", "finished_at"} <= h.keys():
            spans["submit_to_admitted"].append((h["scheduled_at"] - h["enqueued_at"]) * 1000)
            spans["admitted_to_began"].append((h["started_at"] - h["scheduled_at"]) * 1000)
            spans["began_to_finished"].append((h["finished_at"] - h["started_at"]) * 1000)
    return {name: {"p50": pct(v, 0.5), "p99": pct(v, 0.99)} for name, v in spans.items() if v}


def summary(direct: list[float], through: list[float]) -> dict[str, Any]:
    return {
        "direct_ms": {"p50": pct(direct, 0.5), "p99": pct(direct, 0.99)},
        "llmq_ms": {"p50": pct(through, 0.5), "p99": pct(through, 0.99)},
        "added_ms": {"p50": pct(through, 0.5) - pct(direct, 0.5), "p99": pct(through, 0.99) - pct(direct, 0.99)},
    }


async def run(url: str, n: int) -> dict[str, Any]:
    prefix = "{strm" + uuid.uuid4().hex[:6] + "}"
    api, mock = free_port(), free_port()
    env = run_env(url, prefix, api) | {
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock}/v1", max_concurrent: 16}}]',
    }
    argvs = [["run", "mock-backend", "--port", str(mock), "--latency-ms", "0"], ["run", "ingest"]]
    argvs += [["run", s, "--port", "0"] for s in ("schedule", "dispatch", "retry")]
    realtime = {"X-LLMQ-Priority": "realtime"}
    results: dict[str, Any] = {}
    with stages(env, *argvs):
        async with httpx.AsyncClient(timeout=30) as http:
            settings = {"latency_ms": 0, "stream_tokens": 8, "tokens_per_s": 0}
            (await http.post(f"http://127.0.0.1:{mock}/admin/config", json=settings)).raise_for_status()
            direct_url = f"http://127.0.0.1:{mock}/v1/chat/completions"
            llmq_url = f"http://127.0.0.1:{api}/v1/chat/completions"
            for name, measure in (("first_token", first_token_ms), ("round_trip", round_trip_ms)):
                print(f"stream: {name}, {n} sequential calls each way ...", flush=True)
                direct: list[float] = []
                through: list[float] = []
                for i in range(n + WARM_UP):
                    d = await measure(http, direct_url, {})
                    t = await measure(http, llmq_url, realtime)
                    if i >= WARM_UP:  # connections, script caches, the first streams followed
                        direct.append(d)
                        through.append(t)
                results[name] = summary(direct, through)
                s = results[name]
                if name == "round_trip":
                    r = aioredis.Redis.from_url(url)
                    s["hops_ms"] = await hops(r, Keys(prefix), ROUND_TRIP_IDS[WARM_UP:])
                    await r.aclose()
                    print("  hops (p50 ms): " + ", ".join(f"{k} {v['p50']:.2f}" for k, v in s["hops_ms"].items()))
                print(
                    f"  direct p50 {s['direct_ms']['p50']:.2f} ms p99 {s['direct_ms']['p99']:.2f} ms; "
                    f"through llmq p50 {s['llmq_ms']['p50']:.2f} ms p99 {s['llmq_ms']['p99']:.2f} ms; "
                    f"added p50 {s['added_ms']['p50']:.2f} ms p99 {s['added_ms']['p99']:.2f} ms",
                    flush=True,
                )
    await drop_prefix(aioredis.Redis.from_url(url), prefix)
    return {"n": n, **results}


async def overload_ttft(url: str, calls: int, backlog: int) -> dict[str, Any]:
    """Realtime streams while ``low`` saturates the backend: a realtime `stream: true` call every 100 ms (its
    time to first token at the client) beside the same call made directly to the backend at the same moment
    (its own time to first token), with ``backlog`` low messages queued first. The backend: 8 slots, 50 ms to
    its first token, then 10 tokens at 100/s (about 140 ms a call)."""
    prefix = "{ovl" + uuid.uuid4().hex[:6] + "}"
    api, mock = free_port(), free_port()
    env = run_env(url, prefix, api) | {
        "LLMQ_QUEUE__DEFAULT_MAX_SIZE": str(backlog + 1000),
        "LLMQ_QUEUE__LEVELS": (
            "[{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: 8, reserved: 1},"
            " {name: low, priority: 4, max_wait_time: 120s, max_concurrent: 8}]"
        ),
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock}/v1", max_concurrent: 8}}]',
    }
    argvs = [["run", "mock-backend", "--port", str(mock), "--latency-ms", "50"], ["run", "ingest"]]
    argvs += [["run", s, "--port", "0"] for s in ("schedule", "dispatch", "retry")]
    body = CHAT | {"stream": True}
    with stages(env, *argvs):
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as http:
            settings = {"latency_ms": 50, "stream_tokens": 10, "tokens_per_s": 100}
            (await http.post(f"http://127.0.0.1:{mock}/admin/config", json=settings)).raise_for_status()
            low = [{"level": "low", "request": body}] * 1000
            for _ in range(backlog // 1000):
                (await http.post(f"http://127.0.0.1:{api}/api/v1/messages/batch", json=low)).raise_for_status()
            await asyncio.sleep(1.0)  # the backend full of low calls, the backlog behind them
            direct_url = f"http://127.0.0.1:{mock}/v1/chat/completions"
            llmq_url = f"http://127.0.0.1:{api}/v1/chat/completions"
            realtime = {"X-LLMQ-Priority": "realtime"}
            tasks = []
            print(f"stream: overload, {calls} realtime streams at 10/s behind {backlog} low messages ...", flush=True)
            for _ in range(calls):
                tasks.append(asyncio.create_task(first_token_ms(http, direct_url, {})))
                tasks.append(asyncio.create_task(first_token_ms(http, llmq_url, realtime)))
                await asyncio.sleep(0.1)
            got = await asyncio.gather(*tasks)
            r = aioredis.Redis.from_url(url)
            low_left = await r.xlen(Keys(prefix).level("low"))
            await r.aclose()
    await drop_prefix(aioredis.Redis.from_url(url), prefix)
    direct, through = got[0::2], got[1::2]
    doc = summary(direct, through) | {"calls": calls, "low_backlog": backlog, "low_entries_left_in_stream": low_left}
    print(
        f"  backend's own TTFT p50 {doc['direct_ms']['p50']:.1f} ms p99 {doc['direct_ms']['p99']:.1f} ms; realtime "
        f"through llmq p50 {doc['llmq_ms']['p50']:.1f} ms p99 {doc['llmq_ms']['p99']:.1f} ms; added p99 "
        f"{doc['added_ms']['p99']:.1f} ms (target: within the level's max_wait_time, 100 ms)",
        flush=True,
    )
    return doc


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument(
        "--overload-calls", type=int, default=100, help="realtime streams under overload (0: skip that figure)"
    )
    parser.add_argument("--backlog", type=int, default=3000, help="low messages queued first (a multiple of 1000)")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url:
        result = await run(url, args.n)
        if args.overload_calls > 0:
            result["overload"] = await overload_ttft(url, args.overload_calls, args.backlog)
    write_result("stream_bench", {"machine": machine(), **result})


if __name__ == "__main__":
    asyncio.run(main())
