"""The dashboard: the page (``ui/``, served at ``/`` to a browser), the one JSON document it polls
(``GET /api/v1/dashboard``) and a message's detail (``GET /api/v1/dashboard/messages/{id}``).

The document is read from what the stages share, never from a stage's memory: each level's depth, in-flight
messages and oldest age (``level_status``), each backend's calls running now (its slots set), its window,
whether its engine holds it and each dispatcher's view of its circuit (``llmq.pipeline.circuits``), the
streams open now with their time to first token (the status hashes of the in-flight messages), every
consumer group's consumers, pending entries and lag (XINFO), and, from the archive, the last ``WINDOW_S``
of finished messages: each level's queue wait and time to first token (p50, p99) and throughput, each
backend's latency and error rate (its messages that ended dead, or failed but not by a 4xx: the request's
fault), each tenant's tokens (its share of all), the newest messages, and the batches (``/v1/batches``) open
or of the last day with their progress. Without
PostgreSQL those are null and the page says so.

It shows every tenant's messages: a tenant's key is refused (``operator_only``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import ResponseError
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from llmq.pipeline import batches, circuits, window
from llmq.pipeline.config import Config
from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.level_status import level_status
from llmq.pipeline.models import Status
from llmq.pipeline.runtime.streams import as_str
from llmq.stages.ingest import schema
from llmq.stages.ingest.http_api import BadInput, operator_only, respond

WINDOW_S = 300
"""The span of the archive the page's rates and percentiles cover."""
RECENT = 25
BATCHES = 20
"""The batches the page lists at most: the open ones and those of the last day, the newest first."""
OPEN_STREAMS = 50
"""The open streams the page lists at most (the oldest first)."""
UI = Path(str(resources.files("llmq.stages.ingest") / "ui"))
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}

_LEVELS_SQL = """
SELECT level, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY queue_wait_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY queue_wait_ms),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY first_token_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY first_token_ms)
FROM messages WHERE finished_at > now() - make_interval(secs => %s) GROUP BY level
"""
_BACKENDS_SQL = """
SELECT backend, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms),
       count(*) FILTER (WHERE status = 'dead' OR (status = 'failed' AND error NOT LIKE '%% answered 4__%%'))
FROM messages WHERE finished_at > now() - make_interval(secs => %s) AND backend IS NOT NULL GROUP BY backend
"""
_TENANTS_SQL = """
SELECT tenant, count(*), sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)),
       sum(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))) OVER ()
FROM messages WHERE finished_at > now() - make_interval(secs => %s) GROUP BY tenant ORDER BY 3 DESC LIMIT 50
"""
_RECENT_SQL = """
SELECT id::text, level, status, tenant, backend, extract(epoch FROM finished_at), queue_wait_ms, latency_ms
FROM messages ORDER BY finished_at DESC LIMIT %s
"""
_BATCHES_SQL = """
SELECT id, status, level, tenant, total, fed, completed, failed, extract(epoch FROM created_at),
       extract(epoch FROM expires_at)
FROM batches WHERE status = ANY(%s) OR created_at > now() - interval '1 day' ORDER BY created_at DESC LIMIT %s
"""
_REQUEST_SQL = "SELECT request::text, tenant, model, session_id FROM messages WHERE id = %s"


class Dashboard:
    def __init__(
        self,
        config: Config,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        pool: AsyncConnectionPool | None,
        view: Callable[[str], Awaitable[schema.MessageView | None]],
    ) -> None:
        self.config = config
        self.view = view
        """A message as ``GET /api/v1/messages/{id}`` shows it (its status hash, else its archived row)."""
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.caps = {lv.name: lv.in_flight_cap for lv in config.queue.levels}

    async def page(self, request: Request) -> Response:
        """``/``: the page for a browser; for anything else, where the API is."""
        if "text/html" in request.headers.get("accept", ""):
            return HTMLResponse((UI / "index.html").read_text())
        return respond({"service": "llmq", "dashboard": "/", "api": "/api/v1", "openapi": "/openapi.json"})

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            raise BadInput(404, "no such file")
        return FileResponse(UI / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    async def document(self, request: Request) -> Response:
        operator_only(request)
        levels = await level_status(self.redis, self.keys, self.config)
        streams, streams_total = await self._streams()
        doc: dict[str, Any] = {
            "at": time.time(),
            "window_s": WINDOW_S,
            "levels": [msgspec.structs.asdict(lv) | {"max_concurrent": self.caps.get(lv.level)} for lv in levels],
            "backends": await self._backends(),
            "streams": streams,
            "streams_total": streams_total,
            "groups": await self._groups(),
            "dead_letters": int(await self.redis.xlen(self.keys.dlq)),
            "archive": None,
        }
        if self.pool is not None:
            try:
                doc["archive"] = await self._archive()
            except (psycopg.Error, OSError, TimeoutError):
                doc["archive"] = None  # the page says the archive cannot be read now
        return respond(doc)

    async def _backends(self) -> list[dict[str, Any]]:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for b in self.config.backends:
            pipe.zcount(self.keys.backend_slots(b.name), now, "+inf")
            pipe.hget(self.keys.backend_limit(b.name), "limit")
            pipe.get(self.keys.backend_held(b.name))
        replies = await pipe.execute()
        views = await circuits.read(self.redis, self.keys, (b.name for b in self.config.backends))
        out = []
        for i, b in enumerate(self.config.backends):
            running, limit, held = replies[3 * i : 3 * i + 3]
            slots = window.slots(b, window.limit_of(limit)) if b.adaptive else b.slots
            out.append(
                {
                    "name": b.name,
                    "running": int(running),
                    "slots": slots,
                    "adaptive": b.adaptive,
                    "held": as_str(held) if held is not None else None,
                    "circuit": circuits.summary(views[b.name]),
                    "models": b.models,
                }
            )
        return out

    async def _streams(self) -> tuple[list[dict[str, Any]], int]:
        """The streamed messages being dispatched now, the longest running first (``OPEN_STREAMS`` of them) and
        how many there are: since when, on which backend, their call's time to first chunk (None: none yet,
        or no call yet: waiting for a backend slot) and how many chunks they sent."""
        pipe = self.redis.pipeline(transaction=False)
        for lv in self.config.queue.levels:
            pipe.zrange(self.keys.inflight(lv.name), 0, -1)
        ids = [as_str(m) for members in await pipe.execute() for m in members]
        fields = ("status", "streamed", "level", "backend", "started_at", "first_token_ms")
        for mid in ids:
            pipe.hmget(self.keys.msg(mid), fields)
            pipe.xlen(self.keys.events(mid))
        replies = await pipe.execute()
        now = time.time()
        out: list[dict[str, Any]] = []
        for mid, values, entries in zip(ids, replies[0::2], replies[1::2], strict=True):
            status, streamed, level, backend, started, ttft = (as_str(v) if v is not None else None for v in values)
            if status != Status.DISPATCHING.value or streamed != "1" or started is None:
                continue
            start = float(started)
            out.append(
                {
                    "id": mid,
                    "level": level,
                    "backend": backend,
                    "running_s": max(0.0, now - start),
                    "ttft_ms": float(ttft) if ttft else None,
                    "chunks": max(0, int(entries) - 1),  # the first entry is the writer's marker
                }
            )
        out.sort(key=lambda s: -s["running_s"])
        return out[:OPEN_STREAMS], len(out)

    async def _groups(self) -> list[dict[str, Any]]:
        streams = [(self.keys.level(lv.name), Group.SCHEDULE.value) for lv in self.config.queue.levels]
        streams += [(self.keys.dispatch, Group.DISPATCH.value), (self.keys.retry, Group.RETRY.value)]
        streams += [(self.keys.done, Group.ARCHIVE.value)]
        out = []
        for stream, group in streams:
            try:
                infos: Any = await self.redis.xinfo_groups(stream)
            except ResponseError:  # no such stream yet: nothing has gone through it
                infos = []
            info = next((g for g in infos if as_str(g["name"]) == group), None)
            out.append(
                {
                    "stream": stream.removeprefix(self.keys.prefix + ":"),
                    "group": group,
                    "consumers": int(info["consumers"]) if info else 0,
                    "pending": int(info["pending"]) if info else 0,
                    "lag": None if not info or info.get("lag") is None else int(info["lag"]),
                }
            )
        return out

    async def _archive(self) -> dict[str, Any]:
        assert self.pool is not None
        async with self.pool.connection(timeout=2) as conn:
            levels = await (await conn.execute(_LEVELS_SQL, (WINDOW_S,))).fetchall()
            backends = await (await conn.execute(_BACKENDS_SQL, (WINDOW_S,))).fetchall()
            tenants = await (await conn.execute(_TENANTS_SQL, (WINDOW_S,))).fetchall()
            recent = await (await conn.execute(_RECENT_SQL, (RECENT,))).fetchall()
            found = await (await conn.execute(_BATCHES_SQL, (list(batches.OPEN), BATCHES))).fetchall()
        return {
            "batches": [
                {
                    "id": batch_id,
                    "status": status,
                    "level": level,
                    "tenant": tenant,
                    "total": total,
                    "fed": fed,
                    "completed": completed,
                    "failed": failed,
                    "created_at": float(created),
                    "expires_at": float(expires),
                }
                for batch_id, status, level, tenant, total, fed, completed, failed, created, expires in found
            ],
            "levels": {
                level: {
                    "finished": n,
                    "per_min": n * 60 / WINDOW_S,
                    "wait_p50_ms": p50,
                    "wait_p99_ms": p99,
                    "ttft_p50_ms": ttft50,
                    "ttft_p99_ms": ttft99,
                }
                for level, n, p50, p99, ttft50, ttft99 in levels
            },
            "backends": {
                name: {"calls": n, "latency_p50_ms": p50, "latency_p99_ms": p99, "error_rate": bad / n if n else 0}
                for name, n, p50, p99, bad in backends
            },
            "tenants": [
                {
                    "tenant": tenant,
                    "finished": n,
                    "tokens": int(tokens or 0),
                    "weight": self.config.tenant(tenant).weight,
                }
                for tenant, n, tokens, _ in tenants
            ],
            # of every tenant: the list holds the 50 that used most
            "tokens_total": int(tenants[0][3] or 0) if tenants else 0,
            "recent": [
                {
                    "id": mid,
                    "level": level,
                    "status": status,
                    "tenant": tenant,
                    "backend": backend,
                    "finished_at": float(finished),
                    "queue_wait_ms": wait,
                    "latency_ms": latency,
                }
                for mid, level, status, tenant, backend, finished, wait, latency in recent
            ],
        }

    async def message(self, request: Request) -> Response:
        """A message's detail: what ``GET /api/v1/messages/{id}`` shows (status, timestamps, the response or
        the error, every failed attempt), and, once archived, its request, tenant and model."""
        operator_only(request)
        message_id = request.path_params["id"]
        try:
            key = uuid.UUID(message_id)
        except ValueError:
            raise BadInput(404, "no such message") from None
        view = await self.view(str(key))
        if view is None:
            raise BadInput(404, "no such message")
        doc: dict[str, Any] = {"message": view, "request": None, "tenant": None, "model": None, "session_id": None}
        if self.pool is None:
            doc["request_note"] = "no archive is configured: requests are kept only in the archive"
            return respond(doc)
        try:
            async with self.pool.connection(timeout=2) as conn:
                row = await (await conn.execute(_REQUEST_SQL, (key,))).fetchone()
        except (psycopg.Error, OSError, TimeoutError):
            doc["request_note"] = "the archive cannot be read now"
            return respond(doc)
        if row is None:
            doc["request_note"] = "not archived yet: the request is shown once the message has finished"
            return respond(doc)
        request_text, doc["tenant"], doc["model"], doc["session_id"] = row
        if request_text is None:
            doc["request_note"] = "not stored: database.postgres.store_bodies is off"
        else:
            doc["request"] = msgspec.Raw(request_text.encode())
        return respond(doc)
