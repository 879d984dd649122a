"""Many streams at once: S concurrent `stream: true` calls on the OpenAI facade, each answered by the mock
backend at T tokens/s, through one ingest and one dispatch process. Every chunk is stamped by the backend
when written (``stamp_chunks``); the client notes when it read it. Reported: every token delivered in
order, the delivery lag (backend write → client read) p50 / p99 / max, the streams open at once, and the
CPU each process spent per relayed chunk. The reference in the same run is the same clients reading the
same streams from the backend directly (lag of the backend and the client alone).

    .venv/bin/python -m benchmarks.many_streams [--redis-url URL] [--streams 1000] [--tokens 300] [--rate 50]

All processes share the machine's cores with Redis and the load generator. Prints figures and writes JSON
to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import psutil
import redis.asyncio as aioredis

from benchmarks._procs import drop_prefix, free_port, machine, pct, redis_url, run_env, stages, write_result

TARGET_LAG_P99_MS = 25.0


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    mock_sent_at: float | None = None


_decode = msgspec.json.Decoder(_Chunk).decode


@dataclass
class Tally:
    lags: list[float] = field(default_factory=list)
    tokens: int = 0
    out_of_order: int = 0
    incomplete: int = 0
    failed: int = 0
    open_now: int = 0
    open_peak: int = 0


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes, tokens: int, tally: Tally) -> None:
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            response.raise_for_status()
            tally.open_now += 1
            tally.open_peak = max(tally.open_peak, tally.open_now)
            expected = 0
            try:
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    now = time.time()
                    chunk = _decode(line[6:])
                    if chunk.mock_sent_at is not None:
                        tally.lags.append(now - chunk.mock_sent_at)
                    for choice in chunk.choices:
                        text = choice.delta.content if choice.delta else None
                        if text:
                            tally.out_of_order += text != f"t{expected} "
                            expected += 1
            finally:
                tally.open_now -= 1
            tally.tokens += expected
            tally.incomplete += expected != tokens
    except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError):
        tally.failed += 1


async def streams(url: str, n: int, tokens: int) -> tuple[Tally, float]:
    body = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": True})
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one_stream(session, url, body, tokens, tally) for _ in range(n)))
    return tally, time.perf_counter() - started


def listener(port: int) -> psutil.Process | None:
    """The process listening on ``port`` on this machine (Redis), when it can be seen."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return psutil.Process(conn.pid)
    except psutil.AccessDenied:
        pass
    return None


def cpu_s(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}


def report(name: str, tally: Tally, seconds: float, n: int, tokens: int) -> dict[str, Any]:
    lags_ms = [lag * 1000 for lag in tally.lags]
    doc = {
        "streams": n,
        "open_at_once": tally.open_peak,
        "seconds": seconds,
        "tokens_delivered": tally.tokens,
        "tokens_expected": n * tokens,
        "out_of_order": tally.out_of_order,
        "incomplete_streams": tally.incomplete,
        "failed_streams": tally.failed,
        "chunks_per_s": len(lags_ms) / seconds,
        "lag_ms": {"p50": pct(lags_ms, 0.5), "p99": pct(lags_ms, 0.99), "max": max(lags_ms, default=float("nan"))},
    }
    print(
        f"  {name}: {doc['tokens_delivered']:,}/{doc['tokens_expected']:,} tokens, {tally.out_of_order} out of order, "
        f"{tally.incomplete} incomplete, {tally.failed} failed; {tally.open_peak} open at once; "
        f"{doc['chunks_per_s']:,.0f} chunks/s; lag p50 {doc['lag_ms']['p50']:.1f} ms "
        f"p99 {doc['lag_ms']['p99']:.1f} ms max {doc['lag_ms']['max']:.1f} ms",
        flush=True,
    )
    return doc


async def run(url: str, n: int, tokens: int, rate: float) -> dict[str, Any]:
    prefix = "{many" + uuid.uuid4().hex[:6] + "}"
    api, mock = free_port(), free_port()
    room = n + 100
    env = run_env(url, prefix, api) | {
        "LLMQ_QUEUE__WORKER__MAX_CONCURRENT": str(room),
        "LLMQ_QUEUE__LEVELS": f"[{{name: normal, priority: 1, max_wait_time: 60s, max_concurrent: {room}}}]",
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock}/v1", max_concurrent: {room}}}]',
    }
    argvs = [["run", "mock-backend", "--port", str(mock), "--latency-ms", "0"], ["run", "ingest"]]
    argvs += [["run", s, "--port", "0"] for s in ("schedule", "dispatch", "retry")]
    results: dict[str, Any] = {"streams": n, "tokens": tokens, "tokens_per_s": rate}
    with stages(env, *argvs) as procs:
        watched = {argv[1]: psutil.Process(p.pid) for argv, p in zip(argvs, procs, strict=True)}
        redis_proc = listener(urlsplit(url).port or 6379)
        if redis_proc is not None:
            watched["redis"] = redis_proc
        watched["clients (this process)"] = psutil.Process()
        async with aiohttp.ClientSession() as http:
            settings = {"latency_ms": 0, "stream_tokens": tokens, "tokens_per_s": rate, "stamp_chunks": True}
            async with http.post(f"http://127.0.0.1:{mock}/admin/config", json=settings) as response:
                response.raise_for_status()
        await streams(f"http://127.0.0.1:{api}/v1/chat/completions", 20, 5)  # warm: connections, scripts
        for name, target in (("direct", mock), ("through llmq", api)):
            print(f"{n} streams of {tokens} tokens at {rate:g} tokens/s, {name} ...", flush=True)
            before = cpu_s(watched)
            tally, seconds = await streams(f"http://127.0.0.1:{target}/v1/chat/completions", n, tokens)
            spent = {k: v - before[k] for k, v in cpu_s(watched).items()}
            doc = report(name, tally, seconds, n, tokens)
            chunks = max(1, len(tally.lags))
            doc["cpu_s"] = {k: round(v, 2) for k, v in spent.items()}
            doc["cpu_us_per_chunk"] = {k: round(v / chunks * 1e6, 1) for k, v in spent.items()}
            print("  CPU µs per chunk: " + ", ".join(f"{k} {v}" for k, v in doc["cpu_us_per_chunk"].items()))
            results[name] = doc
    await drop_prefix(aioredis.Redis.from_url(url), prefix)
    results["target_lag_p99_ms"] = TARGET_LAG_P99_MS
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--streams", type=int, default=1000, help="streams at once")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per stream (one chunk each)")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second of each stream")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url:
        result = await run(url, args.streams, args.tokens, args.rate)
    print(f"wrote {write_result('many_streams', {'machine': machine(), **result})}")


if __name__ == "__main__":
    asyncio.run(main())
