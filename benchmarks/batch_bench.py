"""A batch of 50,000 lines through OpenAI's Batch API on llmq: lines per second from the upload's start to the
output file read back, Redis memory and each process's RSS over the run (they should stay flat: the batch
stage feeds the level as it drains), and, with a backend the batch saturates, the realtime level's queue wait
meanwhile against its SLO.

Every stage runs as a process (ingest, schedule, dispatch, retry, archive, batch) on an embedded Valkey and
PostgreSQL unless given. Two runs:

- **echo**: the in-process echo backend (``echo://``, 64 calls at once): the pipeline's own rate.
- **saturated**: a mock backend answering in 20 ms, 16 calls at once, which the batch keeps full; a probe
  submits 10 realtime messages a second through the API while the batch runs, and their wait (dispatch
  start - enqueue) is read back. Target: p99 within the realtime level's ``max_wait_time``.

    .venv/bin/python -m benchmarks.batch_bench [--lines 50000] [--redis-url URL] [--database-url DSN]

Prints figures and writes JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import psutil
import redis.asyncio as aioredis

from benchmarks._procs import (
    drop_prefix,
    free_port,
    machine,
    pct,
    postgres_url,
    redis_url,
    run_env,
    stages,
    write_result,
)
from llmq.pipeline.config import load_config

STAGES = ("schedule", "dispatch", "retry", "archive", "batch")
ENDED = ("completed", "failed", "expired", "cancelled")


def input_file(lines: int) -> bytes:
    out = []
    for i in range(lines):
        body = {"model": "m", "messages": [{"role": "user", "content": f"Summarise document {i} in one line."}]}
        out.append(json.dumps({"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    return ("\n".join(out) + "\n").encode()


async def run(redis: str, database: str, lines: int, saturated: bool) -> dict[str, Any]:
    prefix = "{bb" + uuid.uuid4().hex[:6] + "}"
    api, mock = free_port(), free_port()
    backend = (
        f'[{{name: mock, url: "http://127.0.0.1:{mock}/v1", max_concurrent: 16}}]'
        if saturated
        else '[{name: echo, url: "echo://local/v1", max_concurrent: 64}]'
    )
    env = run_env(redis, prefix, api) | {"LLMQ_DATABASE_URL": database, "LLMQ_BACKENDS": backend}
    argvs = [["run", "ingest"]] + [["run", s, "--port", "0"] for s in STAGES]
    if saturated:
        argvs.append(["run", "mock-backend", "--port", str(mock), "--latency-ms", "20"])
    slo_s = load_config(None, env=env).queue.level("realtime").max_wait_time.seconds  # type: ignore[union-attr]
    body = input_file(lines)
    client = aioredis.Redis.from_url(redis)
    with stages(env, *argvs) as procs:
        watched = {str(p.args[4]): psutil.Process(p.pid) for p in procs}  # type: ignore[index]
        samples: list[dict[str, Any]] = []
        probes: list[str] = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=120) as http:
            base_memory = int((await client.info("memory"))["used_memory"])
            started = time.perf_counter()
            uploaded = await http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", body)})
            uploaded.raise_for_status()
            upload_s = time.perf_counter() - started
            created = await http.post(
                "/v1/batches",
                json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions"},
            )
            created.raise_for_status()
            batch_id = created.json()["id"]
            status: dict[str, Any] = {}
            while True:
                status = (await http.get(f"/v1/batches/{batch_id}")).json()
                if status["status"] in ENDED:
                    break
                samples.append(
                    {
                        "t": time.perf_counter() - started,
                        "redis": int((await client.info("memory"))["used_memory"]),
                        "rss": {name: p.memory_info().rss for name, p in watched.items()},
                        "completed": status["request_counts"]["completed"],
                    }
                )
                if saturated:  # 10 realtime messages a second while the batch holds the backend
                    for _ in range(5):
                        probe = {
                            "level": "realtime",
                            "request": {"model": "m", "messages": [{"role": "user", "content": "now"}]},
                        }
                        probes.append((await http.post("/api/v1/messages", json=probe)).json()["id"])
                await asyncio.sleep(0.5)
            output = await http.get(f"/v1/files/{status['output_file_id']}/content")
            elapsed = time.perf_counter() - started
            waits = []
            for mid in probes:
                view = (await http.get(f"/api/v1/messages/{mid}?wait=30")).json()
                if view.get("started_at") and view.get("enqueued_at"):
                    waits.append((view["started_at"] - view["enqueued_at"]) * 1000)
    await drop_prefix(client, prefix)
    rows = output.content.count(b"\n")
    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2] if samples else []
    return {
        "mode": "saturated" if saturated else "echo",
        "lines": lines,
        "status": status["status"],
        "output_lines": rows,
        "upload_s": round(upload_s, 2),
        "seconds": round(elapsed, 1),
        "lines_per_s": round(lines / elapsed),
        "redis_used_memory_mb": {
            "before": round(base_memory / 2**20, 1),
            "peak": round(max(s["redis"] for s in samples) / 2**20, 1) if samples else None,
            "peak_second_half": round(max(s["redis"] for s in half) / 2**20, 1) if half else None,
            "at_quarters": [
                round(samples[min(len(samples) - 1, len(samples) * q // 4)]["redis"] / 2**20, 1) for q in (1, 2, 3, 4)
            ]
            if samples
            else None,
        },
        "rss_mb": {
            name: {
                "first": round(samples[0]["rss"][name] / 2**20, 1),
                "peak": round(max(s["rss"][name] for s in samples) / 2**20, 1),
                "last": round(samples[-1]["rss"][name] / 2**20, 1),
            }
            for name in (samples[0]["rss"] if samples else {})
        },
        "realtime": {
            "probes": len(waits),
            "wait_p50_ms": round(pct(waits, 0.5), 1) if waits else None,
            "wait_p99_ms": round(pct(waits, 0.99), 1) if waits else None,
            "slo_ms": slo_s * 1000,
        }
        if saturated
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--redis-url")
    parser.add_argument("--database-url")
    parser.add_argument("--modes", default="echo,saturated", help="Which runs: echo, saturated or both.")
    args = parser.parse_args()
    results = []
    with redis_url(args.redis_url) as redis, postgres_url(args.database_url) as database:
        for mode in args.modes.split(","):
            saturated = mode == "saturated"
            result = asyncio.run(run(redis, database, args.lines, saturated))
            print(json.dumps(result, indent=2))
            results.append(result)
    print(write_result("batch", {"machine": machine(), "runs": results}))


if __name__ == "__main__":
    main()
