"""ingest: the HTTP API through which requests enter the queue (Starlette on uvicorn).

The routes, from three parts: the native message API (``messages``), the OpenAI-compatible facade
(``openai_facade``, which queues through the message API's narrow ``enqueue``/``wait_result``), and the
operator's routes (``admin``). How requests are read and answered (bodies, errors naming the field, API
keys, per-route counters) is in ``http_api``. uvicorn owns signals here; clients are injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from llmq.pipeline.config import Config
from llmq.pipeline.keys import Keys
from llmq.stages.ingest.admin import Admin
from llmq.stages.ingest.batches import Batches
from llmq.stages.ingest.dashboard import Dashboard
from llmq.stages.ingest.files import Files
from llmq.stages.ingest.http_api import ApiKeyMiddleware, handled, http_error, server_error
from llmq.stages.ingest.keyring import KeyRing
from llmq.stages.ingest.messages import Messages
from llmq.stages.ingest.openai_facade import OpenAIFacade


def create_app(
    config: Config, *, redis: aioredis.Redis, keys: Keys, pool: AsyncConnectionPool | None = None
) -> Starlette:
    messages = Messages(config, redis=redis, keys=keys, pool=pool)
    admin = Admin(config, redis=redis, keys=keys, pool=pool)
    openai = OpenAIFacade(messages, config)
    files = Files(config, pool=pool)
    batch_api = Batches(config, redis=redis, keys=keys, pool=pool)
    dashboard = Dashboard(config, redis=redis, keys=keys, pool=pool, view=messages.view)
    ring = KeyRing(config.keys_with_tenants, config.server.api_keys_file)
    routes = [
        ("/api/v1/messages", messages.submit, ["POST"]),
        ("/api/v1/messages/batch", messages.submit_batch, ["POST"]),
        ("/api/v1/messages/{id}", messages.message, ["GET", "DELETE"]),
        ("/api/v1/messages/{id}/events", messages.events, ["GET"]),
        ("/v1/chat/completions", openai.chat_completions, ["POST"]),
        ("/v1/completions", openai.completions, ["POST"]),
        ("/v1/embeddings", openai.embeddings, ["POST"]),
        ("/v1/models", openai.models, ["GET"]),
        ("/v1/files", files.create, ["POST"]),
        ("/v1/files", files.list, ["GET"]),
        ("/v1/files/{id}", files.retrieve, ["GET"]),
        ("/v1/files/{id}", files.delete, ["DELETE"]),
        ("/v1/files/{id}/content", files.content, ["GET"]),
        ("/v1/batches", batch_api.create, ["POST"]),
        ("/v1/batches", batch_api.list, ["GET"]),
        ("/v1/batches/{id}", batch_api.retrieve, ["GET"]),
        ("/v1/batches/{id}/cancel", batch_api.cancel, ["POST"]),
        ("/api/v1/health", admin.health, ["GET"]),
        ("/api/v1/queues/status", admin.queues_status, ["GET"]),
        ("/api/v1/dlq", admin.dlq_list, ["GET"]),
        ("/api/v1/dlq", admin.dlq_purge, ["DELETE"]),
        ("/api/v1/dlq/{id}", admin.dlq_show, ["GET"]),
        ("/api/v1/dlq/{id}/replay", admin.dlq_replay, ["POST"]),
        (config.metrics.path, admin.metrics, ["GET"]),
        ("/api/v1/metrics", admin.metrics, ["GET"]),
        ("/openapi.json", admin.openapi_json, ["GET"]),
        ("/docs", admin.docs, ["GET"]),
        ("/", dashboard.page, ["GET"]),
        ("/ui/{name}", dashboard.asset, ["GET"]),
        ("/api/v1/dashboard", dashboard.document, ["GET"]),
        ("/api/v1/dashboard/messages/{id}", dashboard.message, ["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        messages.waiter.start()
        messages.hub.start()
        messages.drain.start()
        depth = asyncio.create_task(admin.refresh_depth())
        watch = asyncio.create_task(ring.watch()) if ring.path else None
        hup = _on_sighup(ring.reload) if ring.path else False
        if pool is not None:
            await pool.open(wait=False)
        try:
            yield
        finally:
            depth.cancel()
            if watch is not None:
                watch.cancel()
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not back to the default, which kills
            await messages.waiter.close()
            await messages.hub.close()
            await messages.drain.close()
            if pool is not None:
                await pool.close()

    return Starlette(
        routes=[Route(path, handled(path, fn), methods=methods) for path, fn, methods in routes],
        middleware=[Middleware(ApiKeyMiddleware, ring=ring, metrics_path=config.metrics.path)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )


def _on_sighup(reload: Callable[[], object]) -> bool:
    """Read the key file again on SIGHUP (besides every few seconds); False where no handler can be set."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        return False
    return True
