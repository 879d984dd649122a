"""A consuming stage for the runtime tests, run in-process or as a real process through the same
``llmq.cli.consume`` path production stages use: ``python -m tests.support.worker --stream S --group G``.

Each entry is a msgpack job ``{"id", "sleep"?, "fail"?}``. The stage pushes ``<id>:<pid>`` to
``<stream>:started`` when it begins a job (outside the transaction) and to ``<stream>:handled`` inside
the batch's commit, as an effect of its XACK, so ``handled`` records exactly the entries this consumer
acked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import msgspec
import redis.asyncio as aioredis

from llmq.cli.consume import consume
from llmq.pipeline.config import Config, load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.logging import setup_logging
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.effects import rpush
from llmq.pipeline.runtime.stage import Stage


class RecordingStage(Stage):
    def __init__(self, *, redis: aioredis.Redis, stream: str, group: str) -> None:
        self.redis = redis
        self.stream = stream
        self.name = group
        self.started_key = f"{stream}:started"
        self.handled_key = f"{stream}:handled"

    async def handle(self, batch: Batch) -> None:
        for entry in batch.entries:
            job: dict[str, Any] = msgspec.msgpack.decode(entry.data)
            await self.redis.rpush(self.started_key, f"{job['id']}:{os.getpid()}")
            if job.get("sleep"):
                await asyncio.sleep(job["sleep"])
            if job.get("fail"):
                raise RuntimeError(f"job {job['id']} always fails")
            batch.ack(entry, rpush(self.handled_key, f"{job['id']}:{os.getpid()}"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stream", required=True)
    parser.add_argument("--group", default="work")
    parser.add_argument("--consumer")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    config = load_config()
    handler = setup_logging(config.logging, stage=args.group)

    def factory(*, config: Config, redis: aioredis.Redis, keys: Keys) -> Stage:
        return RecordingStage(redis=redis, stream=args.stream, group=args.group)

    code = asyncio.run(
        consume(factory, config, consumer=args.consumer, port=args.port, log_handler=handler, connect_timeout_s=10)
    )
    sys.exit(int(code))


if __name__ == "__main__":
    main()
