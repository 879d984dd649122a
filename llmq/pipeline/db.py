"""PostgreSQL: the pool, waiting for the server, and versioned migrations.

Migrations are the ``llmq/pipeline/migrations/NNNN_name.sql`` files, applied in order, each in its own
transaction, recorded in ``llmq_schema_migrations``. A session advisory lock serialises concurrent runs
(several replicas starting at once), and re-running applies nothing new.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg_pool import AsyncConnectionPool
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from llmq.pipeline.config import PostgresConfig
from llmq.pipeline.errors import ConnectError

log = logging.getLogger("llmq.db")

MIGRATION_LOCK = 0x6C6C6D71  # "llmq": the advisory lock key of migrations


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for item in resources.files("llmq.pipeline.migrations").iterdir():
        if item.name.endswith(".sql"):
            version, _, rest = item.name.partition("_")
            found.append(Migration(int(version), rest.removesuffix(".sql"), item.read_text()))
    return sorted(found, key=lambda m: m.version)


def make_pool(cfg: PostgresConfig, *, max_size: int = 4) -> AsyncConnectionPool:
    """A pool that is not open yet (``await pool.open()``); connections fail fast so callers can back off."""
    return AsyncConnectionPool(
        cfg.conninfo, min_size=1, max_size=max_size, open=False, timeout=10, kwargs={"connect_timeout": 5}
    )


def describe(cfg: PostgresConfig) -> str:
    """Where Postgres is, without the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(cfg.conninfo)
    except psycopg.ProgrammingError:
        return "postgresql (unparseable conninfo)"
    host = info.get("host") or "localhost"
    return f"postgresql://{info.get('user', '')}@{host}:{info.get('port', 5432)}/{info.get('dbname', '')}"


async def wait_for_postgres(cfg: PostgresConfig, *, timeout_s: float) -> None:
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(psycopg.OperationalError),
            wait=wait_exponential_jitter(multiplier=0.1, max=5, jitter=0.1),
            stop=stop_after_delay(timeout_s),
            reraise=True,
        ):
            with attempt:
                conn = await psycopg.AsyncConnection.connect(cfg.conninfo, connect_timeout=5)
                await conn.close()
    except psycopg.OperationalError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConnectError(f"cannot connect to PostgreSQL at {describe(cfg)}: {first_line}") from None


async def migrate(conninfo: str) -> list[int]:
    """Apply the migrations not yet applied; return their versions."""
    applied: list[int] = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS llmq_schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM llmq_schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for m in migrations():
                if m.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(m.sql.encode())
                    await conn.execute(
                        "INSERT INTO llmq_schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name)
                    )
                log.info("applied migration %04d_%s", m.version, m.name)
                applied.append(m.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied
