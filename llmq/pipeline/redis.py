"""Redis clients from the config: URL or addr/password/db, TLS with ``rediss://``, retry while starting."""

from __future__ import annotations

import logging
import socket
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from llmq.pipeline.config import RedisConfig
from llmq.pipeline.errors import ConnectError

log = logging.getLogger("llmq.redis")

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class TemporaryError(ResponseError):
    """Redis refuses a command for now, for a reason redis-py has no class of its own for: BUSY (a script runs
    long), NOREPLICAS (too few replicas for min-replicas-to-write), MISCONF (it cannot save to disk)."""


UNAVAILABLE = (
    *CONNECTION_ERRORS,
    ReadOnlyError,
    MasterDownError,
    TryAgainError,
    OutOfMemoryError,
    ClusterDownError,
    TemporaryError,
)
"""Redis cannot serve a command now, but may in a moment: unreachable or restarting (LOADING is a connection
error to redis-py), a replica during a failover (READONLY, MASTERDOWN), a cluster resharding (TRYAGAIN,
CLUSTERDOWN), out of memory (OOM), or a ``TemporaryError``. Every loop backs off and tries again; a commit
whose outcome is known is retried, never dropped."""


class _Parser(_AsyncHiredisParser):
    """redis-py's parser with the temporary refusals it has no class for raised as ``TemporaryError`` (also
    from inside a script, where Redis 7 keeps the error's code)."""

    EXCEPTION_CLASSES = {  # noqa: RUF012 - read-only; typed as redis-py types it
        **_AsyncHiredisParser.EXCEPTION_CLASSES,
        "BUSY": TemporaryError,
        "NOREPLICAS": TemporaryError,
        "MISCONF": TemporaryError,
    }


STALE_RETRIES = 1
"""After Redis restarts, every pooled connection is dead until used once. A pool created from a URL
gets connections that never retry (redis-py), so each of them failed one command, and each such
failure failed a whole batch, counting one more delivery for every entry in it: a restart could push
entries over ``max_deliveries``. One immediate retry on a connection error reconnects instead.

The retry resends a command whose reply was lost after Redis ran it, so it runs twice: every write llmq
makes is safe to repeat (``llmq.pipeline.runtime.effects``, the scripts in ``llmq/pipeline/scripts``), and a read that
delivered entries to a lost reply leaves them in the consumer's own pending list, which it pages through
(``llmq.pipeline.runtime.runner``). ``tests/test_lost_replies.py`` drops such replies on purpose."""
POOL_WAIT_S = 10.0
"""How long a command waits for a free pooled connection before failing (a burst queues, not errors)."""
CONNECT_TIMEOUT_S = 5.0
KEEPALIVE = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None  # Linux has all three
}
"""A peer gone without a word (a partition, a host lost) is detected by the kernel in about 25 s.

Instead of redis-py's per-command socket timeout (5 s by default since redis-py 8): that arms and
cancels an asyncio timer for every reply read and wraps every send in ``wait_for``, which took about
15% of the dispatcher's CPU. A Redis that dies or restarts closes its sockets, which fails commands at
once either way."""


class _HiredisPacking(AbstractConnection):
    """Commands packed by hiredis in C, as redis-py's synchronous client does when hiredis is installed;
    its asyncio client packs in Python. That was a fifth of the dispatcher's CPU in py-spy: 11.5 µs per
    command against 3.7 µs. The bytes sent are the same; an argument hiredis does not take (a memoryview,
    a command name of two words, a type redis-py rejects) goes the Python way."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if (" " if isinstance(name, str) else b" ") in name:  # "CONFIG GET" is sent as two arguments
            return super().pack_command(*args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)

    def pack_commands(self, commands: Any) -> list[bytes]:
        return [packed for args in commands for packed in self.pack_command(*args)]


class _PackedConnection(_HiredisPacking, Connection):
    pass


class _PackedSSLConnection(_HiredisPacking, SSLConnection):
    pass


class _PackedUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _PackedConnection,
    SSLConnection: _PackedSSLConnection,
    UnixDomainSocketConnection: _PackedUnixConnection,
}


def make_redis(cfg: RedisConfig, *, pool_size: int | None = None) -> aioredis.Redis:
    """A client whose bounded pool makes callers wait for a free connection instead of failing with "Too
    many connections" (redis-py's default pool). Replies are bytes: stream payloads are msgpack."""
    options: dict[str, Any] = {
        "max_connections": pool_size or cfg.pool_size,
        "timeout": POOL_WAIT_S,
        "health_check_interval": 30,
        "socket_timeout": None,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "retry": Retry(NoBackoff(), STALE_RETRIES),
        "parser_class": _Parser,
    }
    if not (cfg.url or "").startswith("unix:"):  # TCP only: a unix socket connection refuses these options
        options.update(socket_keepalive=True, socket_keepalive_options=KEEPALIVE)
    if cfg.url:
        pool = aioredis.BlockingConnectionPool.from_url(cfg.url, **options)
    else:
        host, _, port = cfg.addr.rpartition(":")
        pool = aioredis.BlockingConnectionPool(
            host=host or "localhost", port=int(port), db=cfg.db, password=cfg.password or None, **options
        )
    # The URL's scheme chose the class (redis://, rediss://, unix://); its hiredis-packing twin replaces it
    # before the pool makes its first connection. hiredis encodes text as strict UTF-8, redis-py's default.
    kw = pool.connection_kwargs
    if kw.get("encoding", "utf-8") in ("utf-8", "utf8") and kw.get("encoding_errors", "strict") == "strict":
        pool.connection_class = _PACKED.get(pool.connection_class, pool.connection_class)
    return aioredis.Redis(connection_pool=pool)


def describe(cfg: RedisConfig) -> str:
    """Where Redis is, for messages and logs: scheme, host, port and path. The user info is cut at the last
    '@', so a password is left out even when it holds an unescaped '/', '?' or '#', and the query (which
    may carry ``password=``) is left out too."""
    if not cfg.url:
        return f"redis://{cfg.addr}/{cfg.db}"
    scheme, sep, rest = cfg.url.partition("://")
    if not sep:  # not a URL the config accepts (it may be a password pasted in the wrong place)
        return "redis (invalid URL)"
    location = rest.rpartition("@")[2]
    return f"{scheme}://{location.split('?', 1)[0].split('#', 1)[0]}"


async def wait_for_redis(client: aioredis.Redis, cfg: RedisConfig, *, timeout_s: float) -> None:
    """PING with exponential backoff until it answers; ConnectError naming the address after ``timeout_s``."""
    where = describe(cfg)
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(CONNECTION_ERRORS),
            wait=wait_exponential_jitter(multiplier=0.1, max=5, jitter=0.1),
            stop=stop_after_delay(timeout_s),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    log.warning("redis not answering, retrying", extra={"redis": where})
                await client.ping()
    except CONNECTION_ERRORS as exc:
        raise ConnectError(f"cannot connect to Redis at {where} after {timeout_s:g}s: {exc}") from None
