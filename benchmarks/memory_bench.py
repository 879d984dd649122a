"""Redis memory per queued message, for a typical chat request of about 1 KB.

N messages are queued through the ingest stage's own Submitter (level stream entry, status hash,
idempotency record for half of them); the figure is Redis's ``used_memory`` growth divided by N, beside
the size of the request itself and what ``MEMORY USAGE`` reports for each key kind.

    .venv/bin/python -m benchmarks.memory_bench [--redis-url URL] [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from typing import Any

import msgspec
import redis.asyncio as aioredis

from benchmarks._procs import drop_prefix, machine, redis_url, write_result
from pipeline.config import load_config
from pipeline.keys import Keys
from pipeline.models import encode, new_id
from pipeline.submit import Submitter, new_message

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
        await submitter.submit_many([(m, encode(m)) for m in messages[i : i + 1000]])
    after = (await redis.info("memory"))["used_memory"]
    sample = messages[1]
    usage = {
        "level_stream_per_entry": (await redis.memory_usage(keys.level("normal"), samples=0) or 0) / n,
        "status_hash": await redis.memory_usage(keys.msg(sample.id)),
        "idempotency_record": await redis.memory_usage(keys.idem(sample.idempotency_key or "")),
    }
    await drop_prefix(redis, prefix)
    return {
        "n": n,
        "request_json_bytes": len(msgspec.json.encode(REQUEST)),
        "stored_message_bytes": len(encode(sample)),
        "redis_bytes_per_message": (after - before) / n,
        "memory_usage_bytes": usage,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    with redis_url(args.redis_url) as url:
        print(f"memory: {args.n} queued messages of a ~1 KB chat request ...", flush=True)
        doc = {"benchmark": "memory", **await run(url, args.n), "machine": machine()}
    print(json.dumps(doc, indent=2))
    write_result("memory", doc)


if __name__ == "__main__":
    asyncio.run(main())
