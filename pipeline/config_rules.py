"""Configuration rules that span fields: duplicates, orderings, cross-section constraints.

The schema (types, ranges, known values) is checked field by field in ``pipeline.validate``; these run on
the parsed Config once that passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pipeline.echo import ECHO_SCHEME

if TYPE_CHECKING:
    from pipeline.config import Config


def semantic_problems(config: Config) -> list[str]:
    """Checks that need more than one field: duplicates, orderings, cross-section constraints."""
    problems: list[str] = []
    q = config.queue
    if not q.levels:
        problems.append("queue.levels: at least one level is required")
    seen_names: dict[str, int] = {}
    seen_prio: dict[int, int] = {}
    for i, level in enumerate(q.levels):
        where = f"queue.levels[{i}]"
        if level.name in seen_names:
            problems.append(
                f"{where}.name: duplicate level name {level.name!r} (also queue.levels[{seen_names[level.name]}])"
            )
        seen_names.setdefault(level.name, i)
        if level.priority in seen_prio:
            problems.append(
                f"{where}.priority: duplicate priority {level.priority} "
                f"(also queue.levels[{seen_prio[level.priority]}])"
            )
        seen_prio.setdefault(level.priority, i)
        if level.reserved > level.max_concurrent:
            problems.append(f"{where}.reserved: {level.reserved} exceeds max_concurrent {level.max_concurrent}")
        if not level.name or not level.name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"{where}.name: {level.name!r} must be letters, digits, '-' or '_'")
    r = q.retry
    if r.max_backoff.seconds < r.initial_backoff.seconds:
        problems.append(f"queue.retry.max_backoff: {r.max_backoff} is less than initial_backoff {r.initial_backoff}")
    if r.factor < 1:
        problems.append(f"queue.retry.factor: {r.factor} must be >= 1")
    w = q.worker
    if w.claim_timeout.seconds <= w.process_interval.seconds:
        problems.append(
            f"queue.worker.claim_timeout: {w.claim_timeout} must exceed process_interval {w.process_interval}"
        )
    backend_names: dict[str, int] = {}
    for i, backend in enumerate(config.backends):
        if backend.name in backend_names:
            problems.append(f"backends[{i}].name: duplicate backend name {backend.name!r}")
        backend_names.setdefault(backend.name, i)
        if not backend.url.startswith(("http://", "https://", ECHO_SCHEME)):
            problems.append(
                f"backends[{i}].url: {backend.url!r} must start with http://, https:// or echo:// "
                "(an in-process echo backend, for measuring the queue itself)"
            )
    redis = config.database.redis
    if redis and redis.url and not redis.url.startswith(("redis://", "rediss://", "unix://")):
        problems.append(f"database.redis.url: scheme must be redis://, rediss:// or unix://, got {redis.url!r}")
    if redis and not redis.url and ":" not in redis.addr:
        problems.append(f"database.redis.addr: {redis.addr!r} must be host:port")
    pg = config.database.postgres
    if pg and pg.dsn:
        try:
            conninfo_to_dict(pg.dsn)
        except psycopg.ProgrammingError:
            problems.append("database.postgres.dsn: not a PostgreSQL URI or key=value connection string")
    if not config.metrics.path.startswith("/"):
        problems.append(f"metrics.path: {config.metrics.path!r} must start with '/'")
    return problems
