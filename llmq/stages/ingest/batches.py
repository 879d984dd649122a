"""OpenAI's Batch API (``/v1/batches``): create a batch of an uploaded input file, read it, list them, cancel
one. The batch stage (``llmq.stages.batch``) runs it; here a batch is only checked and recorded.

A batch is its creator's tenant's, as its input file is: a tenant's key sees its tenant's batches only.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import msgspec
import psycopg
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import Response

from llmq.pipeline import batches
from llmq.pipeline.batch_input import URLS
from llmq.pipeline.config import Config
from llmq.pipeline.config.durations import parse_duration
from llmq.pipeline.filestore import PostgresFileStore, StoredFile, share_locked
from llmq.pipeline.keys import Keys
from llmq.pipeline.redis import UNAVAILABLE
from llmq.stages.ingest.http_api import (
    NOT_STORABLE,
    ArchiveUnavailable,
    BadInput,
    check_webhook_url,
    decode_json,
    read_body,
    respond,
    tenant_of,
)

WINDOW_MIN_S = 1.0
WINDOW_MAX_S = 7 * 86400.0
LIST_MAX = 100
NOTICES_KEPT = 1000


class CreateBatch(msgspec.Struct, forbid_unknown_fields=True):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: (
        Annotated[
            dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
            msgspec.Meta(max_length=batches.METADATA_MAX),
        ]
        | None
    ) = None


_create = msgspec.json.Decoder(CreateBatch)
_UNREACHABLE = (psycopg.Error, OSError, TimeoutError)


class Batches:
    def __init__(self, config: Config, *, redis: aioredis.Redis, keys: Keys, pool: AsyncConnectionPool | None) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.files = PostgresFileStore(pool) if pool is not None else None
        self.level = config.batch_level
        self.max_body = config.server.max_body_bytes

    def _pool(self) -> AsyncConnectionPool:
        if self.pool is None:
            raise BadInput(503, "the Batch API keeps its batches in PostgreSQL: configure database.postgres")
        return self.pool

    async def create(self, request: Request) -> Response:
        pool = self._pool()
        assert self.files is not None
        tenant = tenant_of(request, request.headers.get("x-llmq-tenant"), "X-LLMQ-Tenant")
        body = decode_json(_create, await read_body(request, limit=self.max_body))

        if body.endpoint not in URLS:
            raise BadInput(400, f"endpoint must be one of {', '.join(URLS)}", "endpoint")
        try:
            window_s = parse_duration(body.completion_window)
        except ValueError:
            window_s = -1.0
        if not WINDOW_MIN_S <= window_s <= WINDOW_MAX_S:
            raise BadInput(400, "completion_window must be a duration from 1s to 7d, e.g. 24h", "completion_window")
        owner = request.scope.get("state", {}).get("tenant")
        check_webhook_url(self.config, body.metadata, tenant, "metadata.webhook_url")
        try:
            async with pool.connection() as conn, conn.transaction():
                # the file's row share-locked until the batch is recorded: a delete waits, then sees it
                found = await share_locked(conn, body.input_file_id)
                batch = await self._insert(conn, body, window_s, found, owner, tenant)
        except psycopg.DataError:
            raise BadInput(400, NOT_STORABLE) from None
        except _UNREACHABLE:
            raise ArchiveUnavailable from None
        await self._notify(batch.id)
        return respond(batches.batch_object(batch))

    async def _insert(
        self,
        conn: Any,
        body: CreateBatch,
        window_s: float,
        found: StoredFile | None,
        owner: str | None,
        tenant: str | None,
    ) -> batches.Batch:
        """The batch recorded, once its input file is checked (BadInput naming what is wrong)."""
        if found is None or (owner is not None and found.tenant != owner):
            raise BadInput(404, f"no such file: {body.input_file_id!r}", "input_file_id")
        if found.purpose != "batch":
            why = f"file {found.id!r} is not a batch input (purpose {found.purpose!r})"
            raise BadInput(400, why, "input_file_id")
        if found.urls != [body.endpoint]:
            named = ", ".join(found.urls)
            why = f"the input file's lines go to {named}; every line must go to {body.endpoint}"
            raise BadInput(400, why, "endpoint")
        return await batches.insert(
            conn,
            endpoint=body.endpoint,
            input_file_id=found.id,
            completion_window=body.completion_window,
            window_s=window_s,
            level=self.level,
            tenant=tenant if tenant is not None else found.tenant,
            metadata=body.metadata,
            total=found.lines,
        )

    async def _notify(self, batch_id: str) -> None:
        """Tell the batch stage to look now; without the notice it looks within a second anyway."""
        with contextlib.suppress(*UNAVAILABLE):
            await self.redis.xadd(self.keys.batches, {"b": batch_id}, maxlen=NOTICES_KEPT, approximate=True)

    async def _visible(self, request: Request) -> batches.Batch:
        pool = self._pool()
        try:
            found = await batches.get(pool, request.path_params["id"])
        except psycopg.DataError:
            raise BadInput(400, NOT_STORABLE) from None
        except _UNREACHABLE:
            raise ArchiveUnavailable from None
        owner = request.scope.get("state", {}).get("tenant")
        if found is None or (owner is not None and found.tenant != owner):
            raise BadInput(404, f"no such batch: {request.path_params['id']!r}", "batch_id")
        return found

    async def retrieve(self, request: Request) -> Response:
        return respond(batches.batch_object(await self._visible(request)))

    async def cancel(self, request: Request) -> Response:
        found = await self._visible(request)
        if found.status in batches.ENDED:
            raise BadInput(409, f"batch {found.id} has ended ({found.status}): there is nothing to cancel", "batch_id")
        try:
            cancelling = await batches.request_cancel(self._pool(), found.id)
        except psycopg.DataError:
            raise BadInput(400, NOT_STORABLE) from None
        except _UNREACHABLE:
            raise ArchiveUnavailable from None
        assert cancelling is not None
        await self._notify(found.id)
        return respond(batches.batch_object(cancelling))

    async def list(self, request: Request) -> Response:
        pool = self._pool()
        q = request.query_params
        limit_text = q.get("limit", "20")
        if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= LIST_MAX:
            raise BadInput(400, f"limit must be an integer from 1 to {LIST_MAX}", "limit")
        limit = int(limit_text)
        owner = request.scope.get("state", {}).get("tenant")
        try:
            found = await batches.page(
                pool, tenant=owner, every_tenant=owner is None, after=q.get("after"), limit=limit + 1
            )
        except psycopg.DataError:
            raise BadInput(400, NOT_STORABLE) from None
        except _UNREACHABLE:
            raise ArchiveUnavailable from None
        data: list[dict[str, Any]] = [batches.batch_object(b) for b in found[:limit]]
        return respond(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(found) > limit,
            }
        )
