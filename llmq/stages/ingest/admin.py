"""The operator's routes of the ingest API: health, level status, metrics, the dead-letter queue, the
OpenAPI document; and the ``queue_depth`` gauge kept current for Prometheus."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from llmq.pipeline.config import Config
from llmq.pipeline.config.durations import parse_duration
from llmq.pipeline.dlq import DeadLetters, NotReplayable
from llmq.pipeline.keys import Keys
from llmq.pipeline.level_status import level_status
from llmq.pipeline.redis import CONNECTION_ERRORS, UNAVAILABLE
from llmq.stages.ingest import schema
from llmq.stages.ingest.http_api import BadInput, operator_only, respond

log = logging.getLogger("llmq.ingest")

QUEUE_DEPTH = Gauge("queue_depth", "Messages waiting for admission in a level (lag + pending)", ["level"])

DEPTH_EVERY_S = 5.0


class Admin:
    def __init__(
        self, config: Config, *, redis: aioredis.Redis, keys: Keys, pool: AsyncConnectionPool | None = None
    ) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.levels = [lv.name for lv in config.queue.levels]
        self.dead = DeadLetters(redis=redis, keys=keys, config=config)

    async def health(self, _: Request) -> Response:
        checks = {"redis": "ok"}
        try:
            await asyncio.wait_for(self.redis.ping(), timeout=2)
            # PING answers while writes are refused (full, a replica, too few replicas): try one
            await asyncio.wait_for(self.redis.set(self.keys.health, "1", px=10_000), timeout=2)
        except TimeoutError:
            checks["redis"] = "down"
        except UNAVAILABLE as exc:
            checks["redis"] = "down" if isinstance(exc, CONNECTION_ERRORS) else "degraded"
        if self.pool is not None:
            try:
                async with self.pool.connection(timeout=2) as conn:
                    await conn.execute("SELECT 1")
                checks["postgres"] = "ok"
            except (psycopg.Error, OSError, TimeoutError):
                checks["postgres"] = "down"
        status = "down" if checks["redis"] == "down" else "ok" if set(checks.values()) == {"ok"} else "degraded"
        return respond(schema.Health(status=status, checks=checks), 503 if status == "down" else 200)

    async def queues_status(self, _: Request) -> Response:
        statuses = await level_status(self.redis, self.keys, self.config)
        for s in statuses:
            QUEUE_DEPTH.labels(level=s.level).set(s.depth)
        return respond({"levels": statuses})

    async def metrics(self, _: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def dlq_list(self, request: Request) -> Response:
        operator_only(request)
        limit = request.query_params.get("limit", "50")
        if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 1000:
            raise BadInput(422, "limit must be an integer from 1 to 1000", "limit")
        return respond([dl.summary() for dl in await self.dead.list(limit=int(limit))])

    async def dlq_show(self, request: Request) -> Response:
        operator_only(request)
        dl = await self.dead.find(request.path_params["id"])
        if dl is None:
            raise BadInput(404, "no such dead letter")
        return respond(dl.summary() | {"request": dl.message.request if dl.message else None})

    async def dlq_replay(self, request: Request) -> Response:
        operator_only(request)
        dl = await self.dead.find(request.path_params["id"])
        if dl is None:
            raise BadInput(404, "no such dead letter (already replayed?)")
        level = request.query_params.get("level")
        if level is not None and level not in self.levels:
            raise BadInput(422, f"unknown level {level!r}; valid levels: {', '.join(self.levels)}", "level")
        try:
            replayed = await self.dead.replay(dl, level=level)
        except NotReplayable as exc:
            raise BadInput(422, str(exc)) from None
        if not replayed:
            raise BadInput(409, "already replayed")
        return respond({"replayed": dl.entry_id, "message_id": dl.message_id})

    async def dlq_purge(self, request: Request) -> Response:
        """``DELETE /api/v1/dlq?older_than=1d``: delete the dead letters older than that (never all: give it)."""
        operator_only(request)
        given = request.query_params.get("older_than")
        try:
            age_s = parse_duration(given or "")
        except ValueError:
            age_s = 0.0
        if age_s <= 0:
            raise BadInput(422, 'older_than must be a duration longer than 0, e.g. "1d" or "12h"', "older_than")
        return respond({"purged": await self.dead.purge(older_than_s=age_s)})

    async def openapi_json(self, _: Request) -> Response:
        doc = schema.openapi(
            title="llmq",
            version="0.1.0",
            levels=self.levels,
            secured=bool(self.config.keys_with_tenants) or self.config.server.api_keys_file is not None,
            max_wait_s=self.config.server.max_poll_wait.seconds,
        )
        return respond(doc)

    async def docs(self, _: Request) -> Response:
        return HTMLResponse(_DOCS)

    async def refresh_depth(self) -> None:
        """Keeps ``queue_depth`` current for Prometheus even when nobody asks for the status."""
        while True:
            try:
                for s in await level_status(self.redis, self.keys, self.config):
                    QUEUE_DEPTH.labels(level=s.level).set(s.depth)
            except UNAVAILABLE:
                pass
            except Exception:  # a loop boundary: the gauge must stay current after one failed read
                log.error("reading queue depths failed", exc_info=True)
            await asyncio.sleep(min(DEPTH_EVERY_S, self.config.queue.monitor_interval.seconds))


_DOCS = """<!doctype html>
<html><head><title>llmq API</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
<noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>
"""
