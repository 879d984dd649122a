"""Redis memory per message, for a typical chat request of about 1 KB: while it waits, and once archived.

*Queued*: N messages are queued through the ingest stage's own Submitter (level stream entry, status hash,
idempotency record for half of them); the figure is Redis's ``used_memory`` growth divided by N, beside
the size of the request itself and what ``MEMORY USAGE`` reports for each key kind.

*Archived*: ``--archived`` messages go through schedule, dispatch (the in-process echo backend) and archive
as processes into PostgreSQL; Redis's growth is measured when the last row is committed, and again once
``queue.archived_retention`` (``--window`` here) has passed: what stays then is the idempotency records
(kept a day) and nothing else per message.

    .venv/bin/python -m benchmarks.memory_bench [--redis-url URL] [--database-url DSN] [--n 20000]
        [--archived 100000] [--window 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import msgspec
import redis.asyncio as aioredis

from benchmarks._procs import drop_prefix, machine, poll_until, postgres_url, redis_url, stages, write_result
from benchmarks.e2e_bench import archived
from llmq.pipeline.config import load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import encode, new_id
from llmq.pipeline.submit import Submission, Submitter, idempotency_record, new_message

REQUEST = {
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly and cite sources." * 2},
        {"role": "user", "content": "Summarise the following ticket for the on-call engineer: " + "lorem ipsum " * 60},
    ],
    "max_tokens": 256,
    "temperature": 0.2,
}


async def run(url: str, n: int) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(url)
    prefix = "{mem" + uuid.uuid4().hex[:6] + "}"
    keys = Keys(prefix)
    env = {"LLMQ_KEY_PREFIX": prefix, "LLMQ_QUEUE__DEFAULT_MAX_SIZE": str(n)}
    submitter = Submitter(load_config(None, env=env), redis=redis, keys=keys)
    messages = [
        new_message(
            message_id=new_id(),
            level="normal",
            request=REQUEST,
            idempotency_key=f"k{i}" if i % 2 else None,
        )
        for i in range(n)
    ]
    before = (await redis.info("memory"))["used_memory"]
    for i in range(0, n, 1000):
        await submitter.submit_many([Submission(m, encode(m)) for m in messages[i : i + 1000]])
    after = (await redis.info("memory"))["used_memory"]
    sample = messages[1]
    usage = {
        "level_stream_per_entry": (await redis.memory_usage(keys.level("normal"), samples=0) or 0) / n,
        "status_hash": await redis.memory_usage(keys.msg(sample.id)),
        "idempotency_record": await redis.memory_usage(
            idempotency_record(keys, "", sample.tenant, sample.idempotency_key or "")
        ),
    }
    await drop_prefix(redis, prefix)
    return {
        "n": n,
        "request_json_bytes": len(msgspec.json.encode(REQUEST)),
        "stored_message_bytes": len(encode(sample)),
        "redis_bytes_per_message": (after - before) / n,
        "memory_usage_bytes": usage,
    }


async def run_archived(url: str, dsn: str, n: int, window_s: int) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(url)
    prefix = "{marc" + uuid.uuid4().hex[:6] + "}"
    keys = Keys(prefix)
    env = {
        "LLMQ_REDIS_URL": url,
        "LLMQ_DATABASE_URL": dsn,
        "LLMQ_KEY_PREFIX": prefix,
        "LLMQ_LOGGING__LEVEL": "warning",
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_QUEUE__DEFAULT_MAX_SIZE": str(n),
        "LLMQ_QUEUE__ARCHIVED_RETENTION": f"{window_s}s",
        "LLMQ_QUEUE__WORKER__MAX_CONCURRENT": "600",
        "LLMQ_QUEUE__LEVELS": "[{name: normal, priority: 1, max_wait_time: 30s, max_concurrent: 1200}]",
        "LLMQ_BACKENDS": '[{name: echo, url: "echo://local/v1", max_concurrent: 1200}]',
    }
    submitter = Submitter(load_config(None, env=env), redis=redis, keys=keys)
    messages = [
        new_message(message_id=new_id(), level="normal", request=REQUEST, idempotency_key=f"k{i}" if i % 2 else None)
        for i in range(n)
    ]
    with stages(env, *(["run", stage, "--port", "0"] for stage in ("schedule", "dispatch", "archive"))):
        rows_before = await archived(dsn)
        before = (await redis.info("memory"))["used_memory"]
        for i in range(0, n, 1000):
            await submitter.submit_many([Submission(m, encode(m)) for m in messages[i : i + 1000]])

        async def all_archived() -> bool:
            return await archived(dsn) >= rows_before + n

        await poll_until(all_archived, timeout_s=600, what=f"{n} archived rows")
        done_at = time.monotonic()
        at_archive = (await redis.info("memory"))["used_memory"]
        # the window, then a trim of what every group acked (every 5 s)
        await asyncio.sleep(max(0.0, done_at + window_s + 6 - time.monotonic()))
        after_window = (await redis.info("memory"))["used_memory"]
        left = {"hashes": 0, "idempotency": 0, "other": 0}
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            kind = "hashes" if b":msg:" in key else "idempotency" if b":idem:" in key else "other"
            left[kind] += 1
        streams = {
            name: await redis.xlen(keys.level(name) if name == "normal" else getattr(keys, name))
            for name in ("normal", "dispatch", "done")
        }
    await drop_prefix(redis, prefix)
    return {
        "n": n,
        "window_s": window_s,
        "bytes_per_message_when_archived": (at_archive - before) / n,
        "bytes_per_message_after_window": (after_window - before) / n,
        "keys_left_after_window": left,
        "stream_entries_left_after_window": streams,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--database-url")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--archived", type=int, default=100_000, help="messages run through to the archive")
    parser.add_argument("--window", type=int, default=20, help="queue.archived_retention in seconds")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url, postgres_url(args.database_url) as dsn:
        print(f"memory: {args.n} queued messages of a ~1 KB chat request ...", flush=True)
        queued = await run(url, args.n)
        print(f"memory: {args.archived} messages run through to PostgreSQL ...", flush=True)
        doc = {"benchmark": "memory", **queued, "archived": await run_archived(url, dsn, args.archived, args.window)}
    doc["machine"] = machine()
    print(json.dumps(doc, indent=2))
    write_result("memory", doc)


if __name__ == "__main__":
    asyncio.run(main())
