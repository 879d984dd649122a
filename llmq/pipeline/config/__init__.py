"""The configuration: the seed's YAML schema as frozen msgspec Structs.

Loaded once by the CLI (``load_config``) from the YAML file plus ``LLMQ_*`` environment variables and
passed down explicitly; nothing here reads the environment at import time. Durations stay in the seed's
string form in YAML ("100ms", "30s") and are parsed once into seconds (fields ending in ``_s`` on the
Structs' ``*_s`` properties are the parsed values).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from llmq.pipeline.config.check import check
from llmq.pipeline.config.durations import parse_duration
from llmq.pipeline.config.rules import SECRET_FIELDS, config_warnings, holds_secret, semantic_problems
from llmq.pipeline.config.urls import within
from llmq.pipeline.errors import ConfigError


class Duration(str):
    """A duration string such as "100ms"; ``.seconds`` is its value. Invalid strings are rejected."""

    __slots__ = ()

    @property
    def seconds(self) -> float:
        return parse_duration(self)


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Duration and isinstance(obj, str):
        parse_duration(obj)
        return Duration(obj)
    raise NotImplementedError


Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section, frozen=True):
    host: str = "0.0.0.0"
    """Address the API and every stage's ops port bind; ``llmq-stage up`` binds 127.0.0.1 unless it is set."""
    port: Port = 8080
    mode: Literal["development", "production"] = "development"
    """``production`` refuses to start without ``api_keys`` unless ``allow_anonymous`` is true."""
    allow_anonymous: bool = False
    """Serve the API without keys in production mode (every result and the dead letters open to anyone)."""
    api_keys_file: str | None = None
    """A file of API keys, one a line, accepted besides ``api_keys`` and read again when it changes: keys
    rotate without a restart (``llmq.stages.ingest.keyring``). With one, the API always needs a key."""
    max_body_bytes: Positive = 1_048_576
    """Largest accepted request body in bytes (413 above it); a batch body may be four times larger."""
    max_batch: Positive = 1000
    """Most messages in one ``POST /api/v1/messages/batch``."""
    max_poll_wait: Duration = Duration("60s")
    """Longest ``GET /api/v1/messages/{id}?wait=`` may hold a request open."""
    sync_timeout: Duration = Duration("120s")
    """How long ``POST /v1/chat/completions`` waits for the result before answering 504 with the message id."""


class PostgresConfig(_Section, frozen=True):
    """PostgreSQL, either as fields or as one ``dsn`` (``postgresql://…``), which wins when set."""

    host: str = "localhost"
    port: Port = 5432
    user: str = "llmqueue"
    password: str = ""
    dbname: str = "llm_queue"
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    dsn: str | None = None
    store_bodies: bool = True
    """Archive each request and response body (jsonb); switch off to keep only metadata."""

    @property
    def conninfo(self) -> str:
        if self.dsn:
            return self.dsn
        parts = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": self.dbname,
            "sslmode": self.sslmode,
        }
        if self.password:
            parts["password"] = self.password
        return " ".join(f"{k}={_quote_conninfo(v)}" for k, v in parts.items())


def _quote_conninfo(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


class RedisConfig(_Section, frozen=True):
    """Redis, either as ``addr`` + ``password`` + ``db`` or as one ``url`` (``redis://`` or ``rediss://``)."""

    addr: str = "localhost:6379"
    password: str = ""
    db: NonNegative = 0
    pool_size: Positive = 100
    url: str | None = None
    key_prefix: str = "{llmq}"
    """Prefix of every key; keep the braces: it is the Redis Cluster hash tag of the deployment."""


class DatabaseConfig(_Section, frozen=True):
    postgres: PostgresConfig | None = None
    redis: RedisConfig | None = None


class LevelConfig(_Section, frozen=True):
    name: str
    priority: NonNegative
    """1 is served first."""
    max_wait_time: Duration
    """The level's queue-wait SLO; past it a message is aged ahead of fresher higher levels."""
    in_flight_cap: Positive = msgspec.field(name="max_concurrent")
    """How many messages of this level may be in flight (admitted, not finished) at once (``max_concurrent``
    in the config, as the seed names it)."""
    max_size: NonNegative | None = None
    """Backpressure threshold for this level; ``queue.default_max_size`` when unset."""
    weight: Positive = 1
    """Share of admissions under the ``weighted`` strategy."""
    cancel_on_disconnect: bool | None = None
    """Cancel a streamed request whose client went away before it reached a backend (after, it runs on and
    stays retrievable). Unset: true for the two levels served first (realtime and high in the seed)."""
    abort_on_disconnect: bool = False
    """Stop a streamed request's backend call when its client goes away after it reached a backend: the
    connection to the backend is closed (vLLM, SGLang and llama.cpp then stop generating, freeing the GPU)
    and the message ends ``cancelled`` with what was generated so far. Off: the generation runs on and its
    answer stays retrievable. Seen at the call's next chunk."""
    reserved: NonNegative = 0
    """Backend slots kept free for this level while it has had a message within ``scheduler.reserve_window``:
    lower levels may not take them. Size it near the level's usual concurrency (arrival rate × call latency)
    so its messages start at once even while lower levels fill the backends."""


class WorkerConfig(_Section, frozen=True):
    max_batch_size: Positive = 100
    """Entries read per XREADGROUP."""
    process_interval: Duration = Duration("1s")
    """Longest a consumer blocks waiting for new entries."""
    in_hand: Positive = msgspec.field(default=50, name="max_concurrent")
    """Entries one consumer process handles at once (``max_concurrent`` in the config)."""
    claim_timeout: Duration = Duration("60s")
    """An entry idle this long is a dead consumer's and is reclaimed; live owners renew before it."""
    max_deliveries: Positive = 5
    """After this many deliveries an entry is poison: it goes to the dead-letter stream and is acked."""
    shutdown_grace: Duration = Duration("30s")
    """On SIGTERM, how long in-hand work may take to finish before the process exits anyway."""


class RetryConfig(_Section, frozen=True):
    initial_backoff: Duration = Duration("1s")
    max_backoff: Duration = Duration("60s")
    factor: float = 2.0
    max_retries: NonNegative = 3


def _seed_levels() -> list[LevelConfig]:
    """The seed's four levels; used when the file names none."""
    return [
        LevelConfig(name="realtime", priority=1, max_wait_time=Duration("100ms"), in_flight_cap=10),
        LevelConfig(name="high", priority=2, max_wait_time=Duration("5s"), in_flight_cap=20),
        LevelConfig(name="normal", priority=3, max_wait_time=Duration("30s"), in_flight_cap=30),
        LevelConfig(name="low", priority=4, max_wait_time=Duration("120s"), in_flight_cap=20),
    ]


class DeadLetterConfig(_Section, frozen=True):
    max_len: Positive = 100_000
    """Most dead letters kept; the oldest go first (trimmed every ``queue.cleanup_interval``)."""
    retention: Duration = Duration("14d")
    """Dead letters older than this are dropped."""


class QueueConfig(_Section, frozen=True):
    levels: list[LevelConfig] = msgspec.field(default_factory=_seed_levels)
    default_max_size: NonNegative = 10000
    monitor_interval: Duration = Duration("30s")
    cleanup_interval: Duration = Duration("5m")
    """How often the dead-letter stream is trimmed to its bounds (acked stream entries go within seconds)."""
    result_retention: Duration = Duration("24h")
    """Longest a finished message's status hash (with its result) stays in Redis while its outcome waits to
    be archived (PostgreSQL down); the outcome itself waits in the done stream, however long."""
    archived_retention: Duration = Duration("1m")
    """How long a finished message's status hash stays in Redis once PostgreSQL has its row (for long-polls
    and reads just after it ended); reads fall back to PostgreSQL after."""
    enable_metrics: bool = True
    enable_auto_scaling: bool = True
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    dead_letters: DeadLetterConfig = msgspec.field(default_factory=DeadLetterConfig)

    def level(self, name: str) -> LevelConfig | None:
        return next((lv for lv in self.levels if lv.name == name), None)

    def max_size(self, level: LevelConfig) -> int:
        return self.default_max_size if level.max_size is None else level.max_size


class SchedulerConfig(_Section, frozen=True):
    strategy: Literal["priority_based", "weighted", "deadline"] = "priority_based"
    check_interval: Duration = Duration("1s")
    max_retries: NonNegative = 3
    timeout: Duration = Duration("30s")
    """Longest a backend call may take."""
    stagger: bool = True
    """While a backlog waits and calls take a regular time, space out the admissions of every level but the
    top one and those with ``reserved`` slots, so slots free one by one instead of in waves and an urgent
    message finds one soon (``llmq.stages.schedule.stagger``)."""
    reserve_window: Duration = Duration("60s")
    """A level's ``reserved`` slots are kept free only while it has had a message within this window: an
    idle realtime level costs the lower levels nothing. ``0s``: kept always."""
    lookahead: Positive = 2000
    """How many waiting messages of each level a scheduler holds in view (at least its ``max_concurrent`` plus
    ``queue.worker.max_batch_size``). Tenants share a level fairly among the messages in view: keep the
    tenants' backlogs within it (``max_queued``) for fairness to hold while one of them floods the level."""
    direct_admission: bool = True
    """A message submitted on its own while no message waits in any level, and a slot is free for it (its
    level's max_concurrent, the backends' capacity less the slots higher levels keep reserved), is admitted by
    the submit script at once instead of waiting for a scheduler to wake: about a millisecond less at idle.
    With any message waiting, admission is the scheduler's alone. With ``stagger``, only for the levels it never
    holds back (the top priority, those with ``reserved`` slots): it learns its spacing from the calls it
    admitted itself. Off while a backend has ``max_concurrent: auto`` or ``metrics_url``: only the scheduler
    follows its window and its engine's holds."""


class LoadBalancerConfig(_Section, frozen=True):
    algorithm: Literal["round_robin", "least_connections", "weighted"] = "round_robin"
    health_check_interval: Duration = Duration("10s")
    max_failures: Positive = 3
    enable_session_affinity: bool = True
    session_timeout: Duration = Duration("30m")


class LoggingConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    output: str = "stdout"
    """``stdout``, ``stderr`` or a file path (reopened on SIGUSR1 for logrotate)."""


class MetricsConfig(_Section, frozen=True):
    """Prometheus endpoints. ingest serves ``path`` on the API port; every other stage serves it on its
    own port: ``port`` for schedule and the next ports for dispatch, retry, archive (8081-8084 by
    default). The seed's 9090 is Prometheus's own port, so it is not the default here."""

    enabled: bool = True
    port: Port = 8081
    path: str = "/metrics"
    targets_dir: str | None = None
    """A folder Prometheus reads targets from (``file_sd_configs``): every stage process but ingest writes its
    ops address there while it runs, so one started with ``--port 0`` (a second dispatcher on one host) is
    scraped too (``llmq.pipeline.runtime.targets``)."""
    targets_host: str | None = None
    """The address Prometheus reaches these processes at, written in their target files. Default: the address
    they bind (``server.host``), or the machine's name when they bind every interface. Prometheus run by
    compose reaches the host as ``host.docker.internal`` (``compose.prod.yaml`` maps it)."""


class ConcurrencyBounds(_Section, frozen=True):
    """The bounds of an adaptive concurrency window (``max_concurrent: auto``)."""

    min: Positive = 1
    max: Positive = 64
    """Also where the window starts: it shrinks from here on the backend's capacity signals."""


class BackendConfig(_Section, frozen=True):
    name: str
    url: str
    """Base URL of an OpenAI-compatible API, e.g. ``http://vllm:8000/v1``."""
    api_key_env: str | None = None
    """Name of the environment variable holding the backend's API key (never the key itself)."""
    weight: Positive = 1
    max_concurrent: Positive | Literal["auto"] = 16
    """Calls the backend runs at once, over every dispatcher; ``auto``: a window within ``concurrency``'s
    bounds that shrinks on the backend's capacity signals (429, 503, 529) and grows while it answers
    (``llmq.stages.dispatch.window``)."""
    concurrency: ConcurrencyBounds | None = None
    """The window's bounds with ``max_concurrent: auto`` (default 1 to 64)."""
    metrics_url: str | None = None
    """The engine's own Prometheus metrics (vLLM, SGLang, llama.cpp: ``http://vllm-a:8000/metrics``): while
    its queue or KV cache is past the limits below, it gets no new call (``llmq.stages.dispatch.engines``)."""
    max_engine_waiting: NonNegative | None = None
    """With ``metrics_url``: no new call while more requests than this wait inside the engine (default 0)."""
    max_kv_cache_usage: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    """With ``metrics_url``: no new call while the engine's KV cache is fuller than this (default 1: never)."""
    priority: Literal["vllm"] | None = None
    """The backend schedules by priority: each call carries its level's ``priority`` number as vLLM's request
    field ``priority`` (lower runs first; vLLM with ``--scheduling-policy priority``)."""
    priority_header: str | None = None
    """The same number in a header of this name, for a gateway that schedules by priority."""
    overcommit: NonNegative = 0
    """With ``priority`` or ``priority_header``: calls of the top-priority level may go this many over the
    backend's slots, as the engine runs them ahead of the others: they never wait for a lower level's call
    to end."""
    rpm: Positive | None = None
    tpm: Positive | None = None
    models: list[str] = msgspec.field(default_factory=list)
    """Models this backend serves; empty means any."""

    @property
    def adaptive(self) -> bool:
        return self.max_concurrent == "auto"

    @property
    def engine_waiting_limit(self) -> int:
        return 0 if self.max_engine_waiting is None else self.max_engine_waiting

    @property
    def kv_cache_limit(self) -> float:
        return 1.0 if self.max_kv_cache_usage is None else self.max_kv_cache_usage

    @property
    def followed(self) -> bool:
        """Whether what it takes moves at run time (an adaptive window, an engine's holds): then only the
        scheduler admits for it, following them."""
        return self.adaptive or self.metrics_url is not None

    @property
    def bounds(self) -> ConcurrencyBounds:
        return self.concurrency or ConcurrencyBounds()

    @property
    def slots(self) -> int:
        """Calls it may run at once: the static number, or the adaptive window's upper bound."""
        return self.max_concurrent if isinstance(self.max_concurrent, int) else self.bounds.max


class TenantLimits(_Section, frozen=True):
    """What a tenant may take: its share of a level's admissions and its quotas (none when unset)."""

    weight: Positive = 1
    """Its share of a level's admissions against the other tenants waiting there, counted in estimated tokens
    (a tenant of weight 2 gets twice the tokens of one of weight 1 while both wait)."""
    max_queued: Positive | None = None
    """Most of its messages accepted and not yet ended (waiting or running); past it, 429."""
    max_in_flight: Positive | None = None
    """Most of its messages admitted at once (calls running or about to); past it, its messages wait in
    their level while other tenants' go ahead."""
    rpm: Positive | None = None
    """Most messages it may submit a minute (429 past it, with when to retry)."""
    tpm: Positive | None = None
    """Most estimated tokens (prompt characters / 4 plus the completion budget) it may submit a minute."""


class TenantConfig(TenantLimits, frozen=True):
    name: str = ""
    """Required: what requests name in ``tenant`` (``X-LLMQ-Tenant``), what the archive's rows carry."""
    api_keys: list[str] = msgspec.field(default_factory=list)
    """API keys that are this tenant's: a request with one of them is the tenant's, whatever it claims."""
    webhook_url: str | None = None
    """Where the events of this tenant's messages and batches go (one may name its own in
    ``metadata.webhook_url``); within ``webhooks.endpoints``."""


class BatchesConfig(_Section, frozen=True):
    """The OpenAI Batch API (``/v1/files``, ``/v1/batches``): input files kept in PostgreSQL, their requests
    run as ordinary messages of one level."""

    level: str | None = None
    """The level a batch's requests run at (they never delay the levels above it); unset, the lowest one."""
    max_file_bytes: Positive = 209_715_200
    """Largest input file accepted (OpenAI's limit: 200 MB); past it, 413."""
    max_lines: Positive = 50_000
    """Most requests in one input file (OpenAI's limit); past it, 422 naming the line."""
    feed_depth: Positive = 1000
    """Most messages waiting in the batches' level that the batch stage keeps queued: it feeds a batch's lines
    as the level drains, so a batch of 50,000 never fills Redis (nor the level's max_size) at once."""


class WebhookEndpoint(_Section, frozen=True):
    """Where webhooks may go, and how they are signed there."""

    url: str = ""
    """Required: a URL prefix (``https://hooks.example.com/llmq/``): any URL starting with it may be named
    (``metadata.webhook_url``, ``tenants[].webhook_url``); no other URL ever gets a request from llmq."""
    secret_env: str = ""
    """Required: the environment variable holding this endpoint's signing secret (``whsec_`` and base64, as
    the Standard Webhooks libraries make it), never the secret itself."""
    tenants: list[str] = msgspec.field(default_factory=list)
    """The tenants whose messages and batches may name it (their events are signed with its secret, which its
    receiver trusts); empty: any tenant's, and requests of no tenant."""


class WebhooksConfig(_Section, frozen=True):
    """Events POSTed when a message or a batch ends, signed as the Standard Webhooks spec says."""

    endpoints: list[WebhookEndpoint] = msgspec.field(default_factory=list)
    """The allow-list: a webhook URL that starts with none of these is refused (422 when it is named)."""
    max_attempts: Positive = 8
    """Deliveries of one event before it is dead-lettered (replayable like any dead letter)."""
    initial_backoff: Duration = Duration("1s")
    max_backoff: Duration = Duration("10m")
    timeout: Duration = Duration("10s")
    """Longest a delivery may take; past it, it is retried."""

    def endpoint(self, url: str, tenant: str | None = None) -> WebhookEndpoint | None:
        """The allowed endpoint ``url`` falls under for ``tenant`` (``llmq.pipeline.config.urls.within``), if
        any."""
        return next((e for e in self.endpoints if within(e.url, url) and (not e.tenants or tenant in e.tenants)), None)


class Config(_Section, frozen=True, dict=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    loadbalancer: LoadBalancerConfig = msgspec.field(default_factory=LoadBalancerConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    backends: list[BackendConfig] = msgspec.field(default_factory=list)
    batches: BatchesConfig = msgspec.field(default_factory=BatchesConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)
    api_keys: list[str] = msgspec.field(default_factory=list)
    """Accepted API keys for the HTTP API; empty means the API is open. These keys belong to no tenant: a
    request with one names its tenant itself (``tenant``, ``X-LLMQ-Tenant``)."""
    tenants: list[TenantConfig] = msgspec.field(default_factory=list)
    """Tenants with a weight, quotas or API keys of their own; any other tenant has ``tenant_defaults``."""
    tenant_defaults: TenantLimits = msgspec.field(default_factory=TenantLimits)
    """The weight and quotas of a tenant not listed in ``tenants`` (a request that names no tenant is the
    unnamed tenant's, with these too)."""

    @property
    def keys_with_tenants(self) -> list[tuple[str, str | None]]:
        """Every API key of the config with the tenant it belongs to (None: ``api_keys``, no tenant's)."""
        return [(k, None) for k in self.api_keys] + [(k, t.name) for t in self.tenants for k in t.api_keys]

    def tenant(self, name: str | None) -> TenantLimits:
        """The weight and quotas of a tenant (looked up for every message: by a dict, not a scan)."""
        return self._tenants_by_name.get(name, self.tenant_defaults) if name is not None else self.tenant_defaults

    @functools.cached_property
    def _tenants_by_name(self) -> dict[str, TenantConfig]:
        return {t.name: t for t in reversed(self.tenants)}  # (the first of a name wins, as validation says)

    @property
    def batch_level(self) -> str:
        """The level a batch's requests run at: ``batches.level``, or the lowest-priority level."""
        if self.batches.level is not None:
            return self.batches.level
        return max(self.queue.levels, key=lambda lv: lv.priority).name

    @property
    def redis(self) -> RedisConfig:
        """The Redis settings, with the seed's defaults when the file names none."""
        return self.database.redis or RedisConfig()

    @property
    def capacity(self) -> int:
        """In-flight slots of the whole deployment: what the backends can run at once."""
        return sum(b.slots for b in self.backends) if self.backends else self.queue.worker.in_hand

    @property
    def staggered(self) -> frozenset[str]:
        """The levels whose admissions the scheduler staggers (``scheduler.stagger``): all but the urgent ones
        (the top priority, those with reserved slots); none with the stagger off."""
        if not self.scheduler.stagger or not self.queue.levels:
            return frozenset()
        top = min(lv.priority for lv in self.queue.levels)
        return frozenset(lv.name for lv in self.queue.levels if lv.priority > top and not lv.reserved)

    @property
    def lease_s(self) -> float:
        """How long an admitted message's in-flight slot is held without renewal (a dispatcher renews it)."""
        return self.scheduler.timeout.seconds + self.queue.worker.claim_timeout.seconds


# Environment variables with a name of their own; every other LLMQ_A__B__C sets the path a.b.c.
_NAMED_ENV = {
    "LLMQ_REDIS_URL": ("database", "redis", "url"),
    "LLMQ_DATABASE_URL": ("database", "postgres", "dsn"),
    "LLMQ_KEY_PREFIX": ("database", "redis", "key_prefix"),
    "LLMQ_API_KEYS": ("api_keys",),
}
_ENV_PREFIX = "LLMQ_"
_NOT_CONFIG_ENV = {"LLMQ_TEST_REDIS_URL", "LLMQ_TEST_DATABASE_URL", "LLMQ_TEST_REQUIRE_OPS_TOOLS", "LLMQ_HOME"}


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (``CONFIG_PATH`` when ``path`` is None; defaults when neither is given),
    apply ``LLMQ_*`` overrides and return the validated Config. Raise ConfigError listing every problem."""
    return read_config(path, env).config


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A valid Config with what loading it found out besides."""

    config: Config
    given: frozenset[str]
    """Dotted paths set by the file or the environment (``server.host``); every other field is a default."""
    warnings: list[str]
    """What is allowed but likely wrong, one line each (``llmq.pipeline.config.rules.config_warnings``)."""


def read_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """``load_config``, keeping which fields were given and the config's warnings."""
    env = os.environ if env is None else env
    if path is None:
        path = env.get("CONFIG_PATH") or None
    source = str(path) if path else "<defaults>"
    raw = _read_yaml(Path(path)) if path else {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"<root>: expected a mapping of sections, got {type(raw).__name__}"])
    origins = _apply_env(raw, env)
    config = parse_config(raw, source=source, origins=origins)
    given = _given(raw)
    return LoadedConfig(config, given, config_warnings(config, given, origins))


def parse_config(raw: dict[str, Any], *, source: str, origins: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed mapping; every error is reported with its dotted path."""
    problems = check(raw, Config, duration_type=Duration, parse_duration=parse_duration, secret=holds_secret)
    if not problems:
        config = msgspec.convert(raw, Config, dec_hook=_dec_hook)
        problems = semantic_problems(config)
    if problems:
        if origins:
            problems = [_annotate(p, origins) for p in problems]
        raise ConfigError(source, problems)
    return config


def _annotate(problem: str, origins: Mapping[str, str]) -> str:
    path = problem.split(":", 1)[0]
    for origin, var in origins.items():
        if _within(path, origin) or _within(origin, path):
            return f"{problem} (from {var})"
    return problem


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith((ancestor + ".", ancestor + "["))


def _given(raw: Mapping[str, Any], prefix: str = "") -> frozenset[str]:
    """The dotted path of every mapping key in ``raw`` (a list is one value)."""
    paths = {prefix + str(key) for key in raw}
    for key, value in raw.items():
        if isinstance(value, dict):
            paths |= _given(value, f"{prefix}{key}.")
    return frozenset(paths)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"<file>: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<file>"
        raise ConfigError(str(path), [f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return {} if data is None else data


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Merge LLMQ_* variables into ``raw``; return dotted path -> variable name for error messages."""
    origins: dict[str, str] = {}
    for var in sorted(env):
        if not var.startswith(_ENV_PREFIX) or var in _NOT_CONFIG_ENV:
            continue
        value: Any = env[var]
        if var in _NAMED_ENV:
            path = _NAMED_ENV[var]
            if var == "LLMQ_API_KEYS":
                value = [k.strip() for k in value.split(",") if k.strip()]
        else:
            path = tuple(part.lower() for part in var[len(_ENV_PREFIX) :].split("__"))
            # A secret stays the text it is: a password of digits is not a number.
            value = value if ".".join(path) in SECRET_FIELDS else _env_scalar(value)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
        origins[".".join(path)] = var
    return origins


def _env_scalar(text: str) -> Any:
    """Environment values are YAML scalars (``8080`` is an int, ``true`` a bool, ``[a, b]`` a list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
