"""Configuration rules that span fields: duplicates, orderings, cross-section constraints.

The schema (types, ranges, known values) is checked field by field in ``llmq.pipeline.config.check``; these run on
the parsed Config once that passed. Problems stop every command; warnings (``config_warnings``) are printed
by ``config validate`` and logged once when a process starts.

No line here quotes a value that may hold a secret (``SECRET_FIELDS``): it names the field's path instead.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from redis.asyncio.connection import parse_url

from llmq.pipeline.echo import ECHO_SCHEME

if TYPE_CHECKING:
    from llmq.pipeline.config import Config

SECRET_FIELDS = (
    "database.redis.password",
    "database.redis.url",
    "database.postgres.password",
    "database.postgres.dsn",
    "api_keys",
    "tenants[].api_keys",
)
"""Fields whose values are or may contain secrets. Backends' keys are not among them: the config names only
the environment variable holding each (``backends[].api_key_env``)."""

IGNORED_FIELDS = {
    "queue.enable_metrics": "metrics are always served",
    "queue.enable_auto_scaling": "scale by adding processes, e.g. with KEDA: ops/k8s/keda.yaml",
    "scheduler.max_retries": "queue.retry.max_retries is the limit",
    "metrics.enabled": "metrics are always served; liveness probes read them",
}
"""Fields of the seed's schema that are accepted but do nothing, each with what to use instead. Naming one in
the file or the environment gets a warning."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP field name (RFC 9110's token)."""
_SENT_BY_LLMQ = frozenset(
    {"authorization", "content-type", "content-length", "host", "transfer-encoding", "connection", "x-llmq-message-id"}
)
"""Headers a call to a backend carries already (or its HTTP client sets): a priority header may not replace one."""


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError on a port that is no number)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and not any(c.isspace() for c in url)


_ENCODE_HINT = "percent-encode any '/', '?', '#' or '@' in the user name and password, e.g. '/' as %2F"


def holds_secret(path: str) -> bool:
    """Whether the value at ``path`` may be a secret: a secret field, an item of one (``api_keys[0]``), or a
    section above one, where a misplaced secret would land (``database.redis: "redis://:pw@host"``)."""
    path = re.sub(r"\[\d+\]", "[]", path)  # tenants[2].api_keys[0] is tenants[].api_keys[]
    return any(
        path == field or path.startswith(field + "[") or field.startswith((path + ".", path + "["))
        for field in SECRET_FIELDS
    )


def config_warnings(config: Config, given: Collection[str], origins: Mapping[str, str]) -> list[str]:
    """What is allowed but likely wrong, one line each: fields that do nothing (of ``given``, the dotted paths
    the file or the environment set, named with their variable from ``origins``), a shutdown grace shorter
    than a backend call, and a tenant whose in-flight cap lets its backlog fill the schedulers' view."""
    warnings: list[str] = []
    ignored = [
        f"{path} ({why})" + (f" (from {origins[path]})" if path in origins else "")
        for path, why in IGNORED_FIELDS.items()
        if path in given
    ]
    if ignored:
        warnings.append(f"fields that do nothing, safe to remove: {'; '.join(ignored)}")
    grace, timeout = config.queue.worker.shutdown_grace, config.scheduler.timeout
    if grace.seconds < timeout.seconds:
        warnings.append(
            f"queue.worker.shutdown_grace: {grace} is shorter than scheduler.timeout {timeout}: on SIGTERM a "
            "longer backend call is abandoned, reclaimed and made again; make the grace at least the timeout "
            "(and the container's stop grace period longer than both)"
        )
    lookahead = config.scheduler.lookahead
    capped = [t for t in config.tenants if t.max_in_flight]
    queued = sum(t.max_queued or lookahead + 1 for t in capped)
    if config.tenant_defaults.max_in_flight:
        warnings.append(
            "tenant_defaults.max_in_flight: every tenant not listed is capped, and their backlogs together are "
            "bounded by nothing: they can fill a scheduler's view of a level (scheduler.lookahead), and other "
            "tenants' messages behind them wait while slots are free; cap listed tenants, each with a max_queued"
        )
    elif queued > lookahead:
        warnings.append(
            f"tenants[].max_in_flight: the capped tenants' max_queued add up to more than scheduler.lookahead "
            f"({lookahead}) (or one has none): their backlogs can fill a scheduler's view of a level, and other "
            "tenants' messages behind them wait while slots are free"
        )
    return warnings


DURATION_BOUNDS = {
    "scheduler.check_interval": (0.01, None, "the scheduler's idle wake-up: shorter spins a core"),
    "scheduler.timeout": (0.001, None, "a backend call"),
    "loadbalancer.health_check_interval": (0.1, None, "probing a backend that is out: shorter spins a core"),
    "loadbalancer.session_timeout": (1.0, None, "a session's pin"),
    "queue.monitor_interval": (0.1, None, "refreshing the depth gauge"),
    "queue.cleanup_interval": (1.0, None, "trimming the dead letters"),
    "queue.result_retention": (1.0, 3650 * 86400.0, "a Redis TTL"),
    "queue.archived_retention": (1.0, 3650 * 86400.0, "a Redis TTL"),
    "queue.dead_letters.retention": (1.0, None, "keeping dead letters"),
    "queue.worker.process_interval": (0.001, None, "a blocking read"),
    "server.sync_timeout": (0.001, None, "waiting for a result"),
}
"""Durations with a floor (zero would spin a core or end at once) and, for TTLs, a ceiling Redis accepts:
path -> (least seconds, most seconds or None, what it times)."""


def _duration_problems(config: Config) -> list[str]:
    problems = []
    for path, (least, most, what) in DURATION_BOUNDS.items():
        value: Any = config
        for part in path.split("."):
            value = getattr(value, part)
        if value.seconds < least:
            problems.append(f"{path}: {value} is too short ({what}); at least {least:g}s")
        elif most is not None and value.seconds > most:
            problems.append(f"{path}: {value} is too long ({what}); at most {most / 86400:g} days")
    return problems


def semantic_problems(config: Config) -> list[str]:
    """Checks that need more than one field: duplicates, orderings, cross-section constraints, bounds."""
    problems: list[str] = _duration_problems(config)
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
        if level.reserved > level.in_flight_cap:
            problems.append(f"{where}.reserved: {level.reserved} exceeds max_concurrent {level.in_flight_cap}")
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
                f"backends[{i}].url: scheme must be http://, https:// or echo:// "
                f"(an in-process echo backend, for measuring the queue itself), got {_scheme(backend.url)}"
            )
        elif "?" in backend.url or "#" in backend.url:
            problems.append(
                f"backends[{i}].url: must end with the API's base path (as http://host:8000/v1): a query or "
                "fragment would come before the endpoint llmq appends (/chat/completions)"
            )
        if backend.concurrency is not None and not backend.adaptive:
            problems.append(
                f"backends[{i}].concurrency: bounds an adaptive window, so it needs max_concurrent: auto "
                f"(max_concurrent is {backend.max_concurrent})"
            )
        elif backend.bounds.min > backend.bounds.max:
            problems.append(
                f"backends[{i}].concurrency.min: {backend.bounds.min} must not exceed max {backend.bounds.max}"
            )
        if backend.overcommit and backend.priority is None and backend.priority_header is None:
            problems.append(
                f"backends[{i}].overcommit: only a backend that schedules by priority may be overcommitted "
                "(set priority: vllm or priority_header)"
            )
        if backend.priority_header is not None and not _HEADER.fullmatch(backend.priority_header):
            problems.append(f"backends[{i}].priority_header: {backend.priority_header!r} is no HTTP header name")
        elif backend.priority_header is not None and backend.priority_header.lower() in _SENT_BY_LLMQ:
            problems.append(
                f"backends[{i}].priority_header: {backend.priority_header} is a header llmq sends itself "
                f"({', '.join(sorted(_SENT_BY_LLMQ))}): name another"
            )
        if backend.metrics_url is not None and not _is_http_url(backend.metrics_url):
            problems.append(
                f"backends[{i}].metrics_url: must be an http:// or https:// URL with a host "
                "(the engine's /metrics, as http://vllm-a:8000/metrics)"
            )
        for name, value in (
            ("max_engine_waiting", backend.max_engine_waiting),
            ("max_kv_cache_usage", backend.max_kv_cache_usage),
        ):
            if value is not None and backend.metrics_url is None:
                problems.append(f"backends[{i}].{name}: applies to the engine's metrics, so it needs metrics_url")
        if backend.api_key_env is not None and not _ENV_NAME.fullmatch(backend.api_key_env):
            problems.append(
                f"backends[{i}].api_key_env: must be the name of the environment variable that holds the key "
                "(letters, digits, '_'), never the key itself"
            )
    for i, key in enumerate(config.api_keys):
        if not key.strip():
            problems.append(f"api_keys[{i}]: an empty key would let in every request that sends none")
    problems += _tenant_problems(config)
    for i, endpoint in enumerate(config.webhooks.endpoints):
        if not _is_http_url(endpoint.url):
            problems.append(f"webhooks.endpoints[{i}].url: must be an http(s) URL (a prefix of the URLs allowed)")
        if not _ENV_NAME.fullmatch(endpoint.secret_env) or endpoint.secret_env.startswith("whsec_"):
            problems.append(
                f"webhooks.endpoints[{i}].secret_env: must be the name of the environment variable that holds the "
                "signing secret (letters, digits, '_'), never the secret itself"
            )
    for i, tenant in enumerate(config.tenants):
        if tenant.webhook_url is not None and config.webhooks.endpoint(tenant.webhook_url, tenant.name) is None:
            problems.append(f"tenants[{i}].webhook_url: is under none of webhooks.endpoints[].url open to it")
    if config.batches.level is not None and q.level(config.batches.level) is None:
        problems.append(
            f"batches.level: {config.batches.level!r} is no level of queue.levels "
            f"({', '.join(lv.name for lv in q.levels)})"
        )
    key_file = config.server.api_keys_file
    if (
        config.server.mode == "production"
        and not config.keys_with_tenants
        and key_file is None
        and not config.server.allow_anonymous
    ):
        problems.append(
            "api_keys: server.mode is production but no API key is set, so anyone could read every result and "
            "replay dead letters; set api_keys (or LLMQ_API_KEYS, or server.api_keys_file), or "
            "server.allow_anonymous: true to mean it"
        )
    problems += _connection_problems(config)
    if not config.metrics.path.startswith("/"):
        problems.append(f"metrics.path: {config.metrics.path!r} must start with '/'")
    return problems


def _tenant_problems(config: Config) -> list[str]:
    problems = []
    names: dict[str, int] = {}
    owners: dict[str, str] = {}
    for i, tenant in enumerate(config.tenants):
        if not tenant.name.strip():
            problems.append(f"tenants[{i}].name: required, and not blank")
        elif tenant.name in names:
            problems.append(f"tenants[{i}].name: {tenant.name!r} is tenants[{names[tenant.name]}] already")
        names.setdefault(tenant.name, i)
        for j, key in enumerate(tenant.api_keys):
            where = f"tenants[{i}].api_keys[{j}]"
            if not key.strip():
                problems.append(f"{where}: an empty key would let in every request that sends none")
            elif key in config.api_keys:
                problems.append(f"{where}: the key is in api_keys too, where it belongs to no tenant")
            elif key in owners and owners[key] != where:
                problems.append(f"{where}: the key is {owners[key]} already; a key belongs to one tenant")
            owners.setdefault(key, where)
    return problems


def _connection_problems(config: Config) -> list[str]:
    """Where Redis and PostgreSQL are, checked so that what the clients read is what was meant: a password
    with an unescaped '/' would otherwise be read in part as a host or a port, and printed as one."""
    problems: list[str] = []
    redis = config.database.redis
    if redis and redis.url:
        if not redis.url.startswith(("redis://", "rediss://", "unix://")):
            problems.append(
                f"database.redis.url: scheme must be redis://, rediss:// or unix://, got {_scheme(redis.url)}"
            )
        elif not _parses(redis.url):
            problems.append(f"database.redis.url: the host, port or user info does not parse; {_ENCODE_HINT}")
    elif redis and not _is_host_port(redis.addr):
        problems.append(
            "database.redis.addr: must be host:port, e.g. redis:6379 (a URL, with its password, goes in "
            "database.redis.url)"
        )
    pg = config.database.postgres
    if pg and pg.dsn:
        try:
            info = conninfo_to_dict(pg.dsn)
        except psycopg.ProgrammingError:
            problems.append("database.postgres.dsn: not a PostgreSQL URI or key=value connection string")
        else:
            if any("@" in str(info.get(k, "")) for k in ("host", "port", "dbname")):
                problems.append(f"database.postgres.dsn: the user info does not parse; {_ENCODE_HINT}")
    elif pg and ("@" in pg.host or "://" in pg.host):
        problems.append(
            "database.postgres.host: must be a host name or a socket directory (a URL, with its password, goes "
            "in database.postgres.dsn)"
        )
    return problems


def _scheme(url: str) -> str:
    """The scheme of a URL, quoted, for a problem line (the rest may hold a password); "none" without one."""
    scheme, sep, _ = url.partition("://")
    return repr(scheme + sep) if sep and scheme.isalnum() else "none"


def _parses(url: str) -> bool:
    """Whether redis-py reads the URL as written: its user info (up to the last '@') is all in the network
    location, and the port and query arguments parse."""
    try:
        if url.count("@") != urlsplit(url).netloc.count("@"):  # an '@' past a '/', '?' or '#' of the password
            return False
        parse_url(url)
    except ValueError:  # "Invalid IPv6 URL" for a '[' or ']' in the password, a port that is not a number
        return False
    return True


def _is_host_port(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    return bool(host) and port.isascii() and port.isdigit() and not any(c in host for c in "@/")
