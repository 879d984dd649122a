"""The ingest API called in-process, as under uvicorn."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import redis.asyncio as aioredis

from llmq.pipeline.config import load_config
from llmq.pipeline.keys import Keys
from llmq.stages.ingest import create_app

QUEUEING = {"LLMQ_SCHEDULER__DIRECT_ADMISSION": "false"}
"""For an ingest with nothing consuming, as tests of queueing look at it: every message waits in its level (a
lone message would otherwise be admitted at once, straight to the dispatch stream)."""


@contextlib.asynccontextmanager
async def client_for(
    redis: aioredis.Redis, keys: Keys, env: dict[str, str] | None = None, pool: Any = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The ingest app with its lifespan running (as under uvicorn), called in-process, nothing consuming
    (``QUEUEING``)."""
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix, **QUEUEING, **(env or {})})
    app = create_app(config, redis=redis, keys=keys, pool=pool)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield client
