"""Where the Batch API's files live: ``FileStore``, the few operations the API and the batch stage need, and
``PostgresFileStore``, which keeps each file as rows of at most ``CHUNK`` bytes (migration 0004).

A file is written in one transaction, its pieces as they come (the caller checks them on the way: a piece
that raises rolls the whole file back), and read back a chunk at a time, each read on a connection held only
for it: a slow download holds no connection. Another store (S3-compatible, say) implements the same
protocol.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, Protocol

import msgspec
from psycopg_pool import AsyncConnectionPool

CHUNK = 1 << 20


class StoredFile(msgspec.Struct, frozen=True):
    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    """Unix seconds."""
    tenant: str | None
    lines: int
    """Requests in it (an input file; 0 for others)."""
    urls: list[str]
    """The endpoints its lines name (an input file)."""


class Facts(msgspec.Struct, frozen=True):
    """What the caller learnt of a file while it was written."""

    lines: int = 0
    urls: list[str] = []


class FileStore(Protocol):
    async def put(
        self,
        *,
        purpose: str,
        filename: str,
        tenant: str | None,
        pieces: AsyncIterable[bytes],
        facts: Callable[[], Facts],
        file_id: str | None = None,
    ) -> StoredFile:
        """Store the file ``pieces`` make, whole or not at all (an exception from ``pieces`` stores nothing);
        ``facts()`` is asked once they are all in. With ``file_id``, the file of that id is replaced (a batch's
        output written again after a restart)."""
        ...

    async def get(self, file_id: str) -> StoredFile | None: ...

    def read(self, file: StoredFile) -> AsyncIterator[bytes]:
        """The file's bytes, a chunk at a time."""
        ...

    async def chunk(self, file_id: str, seq: int) -> bytes | None:
        """The file's ``seq``-th chunk (from 0), None past its end."""
        ...

    async def list(
        self,
        *,
        tenant: str | None,
        every_tenant: bool,
        purpose: str | None,
        after: str | None,
        limit: int,
        newest_first: bool,
    ) -> list[StoredFile]: ...


def new_file_id() -> str:
    return "file-" + os.urandom(12).hex()


_COLUMNS = "id, purpose, filename, bytes, extract(epoch FROM created_at)::bigint, tenant, lines, urls"


class PostgresFileStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def put(
        self,
        *,
        purpose: str,
        filename: str,
        tenant: str | None,
        pieces: AsyncIterable[bytes],
        facts: Callable[[], Facts],
        file_id: str | None = None,
    ) -> StoredFile:
        async with self.pool.connection() as conn, conn.transaction():
            if file_id is None:
                file_id = new_file_id()
            else:
                await conn.execute("DELETE FROM files WHERE id = %s", (file_id,))
            await conn.execute(
                "INSERT INTO files (id, purpose, filename, bytes, chunks, tenant) VALUES (%s, %s, %s, 0, 0, %s)",
                (file_id, purpose, filename, tenant),
            )
            seq = size = 0
            held = bytearray()
            async for piece in pieces:
                held += piece
                size += len(piece)
                while len(held) >= CHUNK:
                    await conn.execute(
                        "INSERT INTO file_chunks (file_id, seq, data) VALUES (%s, %s, %s)",
                        (file_id, seq, bytes(held[:CHUNK])),
                    )
                    del held[:CHUNK]
                    seq += 1
            if held:
                await conn.execute(
                    "INSERT INTO file_chunks (file_id, seq, data) VALUES (%s, %s, %s)", (file_id, seq, bytes(held))
                )
                seq += 1
            known = facts()
            cur = await conn.execute(
                f"UPDATE files SET bytes = %s, chunks = %s, lines = %s, urls = %s WHERE id = %s RETURNING {_COLUMNS}",
                (size, seq, known.lines, sorted(known.urls), file_id),
            )
            row = await cur.fetchone()
        assert row is not None
        return _file(row)

    async def get(self, file_id: str) -> StoredFile | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(f"SELECT {_COLUMNS} FROM files WHERE id = %s", (file_id,))
            row = await cur.fetchone()
        return _file(row) if row else None

    async def read(self, file: StoredFile) -> AsyncIterator[bytes]:
        seq = 0
        while (data := await self.chunk(file.id, seq)) is not None:
            yield data
            seq += 1

    async def chunk(self, file_id: str, seq: int) -> bytes | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT data FROM file_chunks WHERE file_id = %s AND seq = %s", (file_id, seq))
            row = await cur.fetchone()
        return bytes(row[0]) if row is not None else None

    async def list(
        self,
        *,
        tenant: str | None,
        every_tenant: bool,
        purpose: str | None,
        after: str | None,
        limit: int,
        newest_first: bool,
    ) -> list[StoredFile]:
        where, args = ["TRUE"], []
        if not every_tenant:
            where.append("tenant IS NOT DISTINCT FROM %s")
            args.append(tenant)
        if purpose is not None:
            where.append("purpose = %s")
            args.append(purpose)
        if after is not None:
            direction = "<" if newest_first else ">"
            where.append(f"(created_at, id) {direction} (SELECT created_at, id FROM files WHERE id = %s)")
            args.append(after)
        order = "DESC" if newest_first else "ASC"
        sql = (
            f"SELECT {_COLUMNS} FROM files WHERE {' AND '.join(where)} ORDER BY created_at {order}, id {order} LIMIT %s"
        )
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql.encode(), (*args, limit))
            return [_file(row) for row in await cur.fetchall()]


async def share_locked(conn: Any, file_id: str) -> StoredFile | None:
    """The file, its row share-locked in ``conn``'s transaction: it cannot be deleted until that ends (a batch
    created of it is recorded first, and the delete then sees it)."""
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM files WHERE id = %s FOR SHARE", (file_id,))
    row = await cur.fetchone()
    return _file(row) if row else None


def _file(row: tuple[object, ...]) -> StoredFile:
    file_id, purpose, filename, size, created, tenant, lines, urls = row
    return StoredFile(
        id=str(file_id),
        purpose=str(purpose),
        filename=str(filename),
        bytes=int(size),  # type: ignore[call-overload]
        created_at=int(created),  # type: ignore[call-overload]
        tenant=None if tenant is None else str(tenant),
        lines=int(lines),  # type: ignore[call-overload]
        urls=list(urls),  # type: ignore[call-overload]
    )
