"""OpenAI's Files API (``/v1/files``), for the Batch API: upload a batch's input, read a batch's output.

An upload (multipart, ``purpose=batch``) is spooled by the form parser (to disk past 1 MiB), then checked
line by line (``llmq.pipeline.batch_input``) while it is stored (``llmq.pipeline.filestore``): a bad line
gets 422 naming the line and the field, and nothing is stored. The body is cut off past
``batches.max_file_bytes`` (413), whatever its Content-Length says.

A file is its uploader's tenant's: a tenant's key sees its tenant's files only (others are 404); an
operator's key (one of no tenant), or any request where no keys are configured, sees every file.
"""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive

from llmq.pipeline import batches
from llmq.pipeline.batch_input import BadLine, LineChecker
from llmq.pipeline.config import Config
from llmq.pipeline.filestore import CHUNK, Facts, FileStore, PostgresFileStore, StoredFile
from llmq.stages.ingest.http_api import NOT_STORABLE, ArchiveUnavailable, BadInput, respond, tenant_of

PURPOSES = ("batch",)
FORM_OVERHEAD = 64 * 1024
"""What a multipart body holds beyond the file: boundaries, headers, the purpose field."""
FILENAME_MAX = 255
LIST_MAX = 10_000


class FileObject(msgspec.Struct, kw_only=True):
    """A file as OpenAI's API describes it."""

    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None


def file_object(f: StoredFile) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename, purpose=f.purpose)


class _TooLarge(Exception):
    pass


class Files:
    def __init__(self, config: Config, *, pool: AsyncConnectionPool | None) -> None:
        self.config = config
        self.pool = pool
        self.store = PostgresFileStore(pool) if pool is not None else None
        self.max_bytes = config.batches.max_file_bytes
        self.max_lines = config.batches.max_lines
        self.max_line_bytes = config.server.max_body_bytes

    def _files(self) -> FileStore:
        if self.store is None:
            raise BadInput(503, "the Batch API keeps its files in PostgreSQL: configure database.postgres")
        return self.store

    async def create(self, request: Request) -> Response:
        store = self._files()
        tenant = tenant_of(request, request.headers.get("x-llmq-tenant"), "X-LLMQ-Tenant")
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise BadInput(415, "upload the file as multipart/form-data, with the fields purpose and file")
        limit = self.max_bytes + FORM_OVERHEAD
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise BadInput(413, f"the file is over batches.max_file_bytes ({self.max_bytes} bytes)", "file")
        capped = Request(request.scope, _capped(request.receive, limit))
        try:
            async with capped.form(max_files=1, max_fields=8) as form:
                purpose, upload = form.get("purpose"), form.get("file")
                if purpose not in PURPOSES:
                    raise BadInput(422, f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
                if not isinstance(upload, UploadFile):
                    raise BadInput(422, "the file field is required: the JSONL file to upload", "file")
                if upload.size is not None and upload.size > self.max_bytes:
                    raise BadInput(413, f"the file is over batches.max_file_bytes ({self.max_bytes} bytes)", "file")
                filename = (upload.filename or "upload.jsonl")[:FILENAME_MAX]
                stored = await self._put(store, str(purpose), filename, tenant, upload)
        except _TooLarge:
            raise BadInput(413, f"the file is over batches.max_file_bytes ({self.max_bytes} bytes)", "file") from None
        except HTTPException as exc:  # the form parser's: a malformed multipart body
            raise BadInput(400, f"malformed multipart body: {exc.detail}") from None
        return respond(file_object(stored))

    async def _put(
        self, store: FileStore, purpose: str, filename: str, tenant: str | None, upload: UploadFile
    ) -> StoredFile:
        checker = LineChecker(max_lines=self.max_lines, max_line_bytes=self.max_line_bytes)

        async def pieces() -> Any:
            while piece := await upload.read(CHUNK):
                checker.feed(piece)
                yield piece
            checker.end()

        try:
            return await store.put(
                purpose=purpose,
                filename=filename,
                tenant=tenant,
                pieces=pieces(),
                facts=lambda: Facts(lines=checker.lines, urls=sorted(checker.urls)),
            )
        except BadLine as exc:
            raise BadInput(422, str(exc), exc.field) from None
        except psycopg.DataError:
            raise BadInput(400, NOT_STORABLE) from None
        except (psycopg.Error, OSError, TimeoutError):
            raise ArchiveUnavailable from None

    async def _visible(self, request: Request) -> StoredFile:
        """The file the path names, if this request's key may see it (404 otherwise)."""
        store = self._files()
        try:
            found = await store.get(request.path_params["id"])
        except psycopg.DataError:
            raise BadInput(400, NOT_STORABLE) from None
        except (psycopg.Error, OSError, TimeoutError):
            raise ArchiveUnavailable from None
        owner = request.scope.get("state", {}).get("tenant")
        if found is None or (owner is not None and found.tenant != owner):
            raise BadInput(404, f"no such file: {request.path_params['id']!r}", "file_id")
        return found

    async def retrieve(self, request: Request) -> Response:
        return respond(file_object(await self._visible(request)))

    async def content(self, request: Request) -> Response:
        found = await self._visible(request)
        # its length declared: a download cut short (the file deleted meanwhile) is seen as cut, not as whole
        headers = {"Content-Length": str(found.bytes)}
        return StreamingResponse(self._files().read(found), media_type="application/jsonl", headers=headers)

    async def delete(self, request: Request) -> Response:
        found = await self._visible(request)
        try:
            assert self.pool is not None  # (_visible answered 503 without one)
            await _delete_unless_used(self.pool, found.id)
        except psycopg.DataError:
            raise BadInput(400, NOT_STORABLE) from None
        except (psycopg.Error, OSError, TimeoutError):
            raise ArchiveUnavailable from None
        return respond({"id": found.id, "object": "file", "deleted": True})

    async def list(self, request: Request) -> Response:
        store = self._files()
        q = request.query_params
        limit_text = q.get("limit", str(LIST_MAX))
        if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= LIST_MAX:
            raise BadInput(400, f"limit must be an integer from 1 to {LIST_MAX}", "limit")
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadInput(400, "order must be asc or desc", "order")
        owner = request.scope.get("state", {}).get("tenant")
        limit = int(limit_text)
        try:
            found = await store.list(
                tenant=owner,
                every_tenant=owner is None,
                purpose=q.get("purpose"),
                after=q.get("after"),
                limit=limit + 1,
                newest_first=order == "desc",
            )
        except psycopg.DataError:
            raise BadInput(400, NOT_STORABLE) from None
        except (psycopg.Error, OSError, TimeoutError):
            raise ArchiveUnavailable from None
        page = [file_object(f) for f in found[:limit]]
        return respond(
            {
                "object": "list",
                "data": page,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(found) > limit,
            }
        )


async def _delete_unless_used(pool: AsyncConnectionPool, file_id: str) -> None:
    """Delete the file unless an open batch reads it (409): its row locked first, so a batch being created of
    it (which share-locks it) is either recorded before (and seen here) or finds it gone."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM files WHERE id = %s FOR UPDATE", (file_id,))
        if await batches.uses_file(conn, file_id):
            raise BadInput(409, f"file {file_id} is the input of a batch still running", "file_id")
        await conn.execute("DELETE FROM files WHERE id = %s", (file_id,))


def _capped(receive: Receive, limit: int) -> Receive:
    """``receive``, raising _TooLarge once the body is past ``limit`` bytes."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
        return message

    return capped
