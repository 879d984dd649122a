"""``llmq-stage``: run stages, the whole dev queue, and operator commands."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
import uvicorn

from llmq.cli import beside_up, loop
from llmq.cli.batches import batches_app
from llmq.cli.common import ConfigOption, load_beside_up, load_or_exit, on_redis, read_or_exit
from llmq.cli.consume import consume
from llmq.cli.dlq import dlq_app
from llmq.cli.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedRedis
from llmq.cli.exit_codes import ExitCode
from llmq.cli.pause import pause, resume
from llmq.cli.purge import purge
from llmq.cli.stages import MOCK_BACKEND_PORT, STAGES, postgres_of
from llmq.cli.supervisor import Child, Supervisor, child_env, stage_argv
from llmq.pipeline.config import Config
from llmq.pipeline.db import describe as describe_postgres
from llmq.pipeline.db import make_pool, migrate, wait_for_postgres
from llmq.pipeline.errors import ConnectError, ListenError
from llmq.pipeline.keyfile import read_key_file
from llmq.pipeline.keys import Keys
from llmq.pipeline.level_status import level_status
from llmq.pipeline.logging import reopen_logs, setup_logging
from llmq.pipeline.redis import describe, make_redis, wait_for_redis
from llmq.pipeline.runtime.ops_server import listen
from llmq.stages.mock_backend import MockBackend, MockSettings

log = logging.getLogger("llmq.cli")

app = typer.Typer(
    name="llmq-stage",
    help="llmq: a durable priority queue for LLM requests on Redis Streams.\n\n"
    "Run the whole queue for development with `llmq-stage up`; run one stage per process in production "
    "with `llmq-stage run <stage>`.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
db_app = typer.Typer(help="PostgreSQL: the schema, and the archive's retention.", no_args_is_help=True)
app.add_typer(db_app, name="db")
db_app.command(
    "purge",
    epilog="Examples:\n\n  llmq-stage db purge --older-than 30d\n\n  llmq-stage db purge --older-than 90d --dry-run",
)(purge)
app.add_typer(dlq_app, name="dlq")
app.add_typer(batches_app, name="batches")
app.command(epilog="Examples:\n\n  llmq-stage pause low\n\n  llmq-stage pause --all --reason 'Redis upgrade'")(pause)
app.command(epilog="Examples:\n\n  llmq-stage resume low\n\n  llmq-stage resume --all")(resume)


@app.command(
    epilog="Examples:\n\n  llmq-stage run ingest --config configs/config.yaml\n\n"
    "  llmq-stage run dispatch --consumer dispatch-a --port 0"
)
def run(
    stage: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}.", show_default=False)],
    config: ConfigOption = None,
    consumer: Annotated[
        str | None,
        typer.Option(help="Consumer name in the stage's group. Default: <hostname>-<n>, lowest free n."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port for /metrics and /health (the API port for ingest). 0 picks a free port."),
    ] = None,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to keep retrying Redis at start before exiting with code 4.")
    ] = 30.0,
    latency_ms: Annotated[float, typer.Option(help="mock-backend: response latency.")] = 50.0,
    jitter_ms: Annotated[float, typer.Option(help="mock-backend: latency is uniform in latency ± jitter.")] = 0.0,
    fail_rate: Annotated[float, typer.Option(help="mock-backend: fraction of calls that fail.")] = 0.0,
    fail_status: Annotated[int, typer.Option(help="mock-backend: HTTP status of failed calls.")] = 500,
    retry_after: Annotated[
        float | None, typer.Option(help="mock-backend: Retry-After seconds sent with failures and 429s.")
    ] = None,
    max_concurrent: Annotated[
        int, typer.Option(help="mock-backend: calls beyond this many at once get 429 (0: unlimited).")
    ] = 0,
) -> None:
    """Run one stage in this process until SIGTERM/SIGINT.

    Exit codes: 0 stopped cleanly, 3 invalid config, 4 cannot connect, 5 consumer name taken,
    7 port in use, 130 second signal during shutdown.
    """
    spec = STAGES.get(stage)
    if spec is None:
        typer.echo(f"error: unknown stage {stage!r}; stages: {', '.join(STAGES)}", err=True)
        raise typer.Exit(ExitCode.USAGE)
    loaded = read_or_exit(config)
    cfg = loaded.config
    problem = _stage_problem(stage, cfg)
    if problem:
        source = config or os.environ.get("CONFIG_PATH") or "<defaults>"
        typer.echo(f"error: invalid configuration {source}:\n  {problem}", err=True)
        raise typer.Exit(ExitCode.CONFIG)
    handler = setup_logging(cfg.logging, stage=stage)
    for warning in loaded.warnings:
        log.warning("config: %s", warning)
    # SIGUSR1's default action kills the process; reopen logs instead from the very start (the event
    # loop installs its own handler for the same once it runs).
    signal.signal(signal.SIGUSR1, lambda *_: reopen_logs(handler))
    # SIGHUP's default action kills the process too: the ingest reloads its key file on it (once serving),
    # every other stage, and the ingest until then, ignores it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    listen_port = spec.default_port(cfg) if port is None else port
    try:
        if stage == "mock-backend":
            settings = MockSettings(
                latency_ms=latency_ms,
                jitter_ms=jitter_ms,
                fail_rate=fail_rate,
                fail_status=fail_status,
                retry_after_s=retry_after,
                busy_above=max_concurrent,
            )
            code = loop.run(_serve_mock(cfg, listen_port, settings, handler))
        elif spec.factory is None:
            code = loop.run(_serve_ingest(cfg, listen_port, handler, connect_timeout))
        elif spec.needs_postgres and not _postgres_answers(cfg, connect_timeout):
            code = ExitCode.CONNECT
        else:
            code = loop.run(
                consume(
                    spec.factory,
                    cfg,
                    consumer=consumer,
                    port=listen_port,
                    log_handler=handler,
                    connect_timeout_s=connect_timeout,
                )
            )
    except ListenError as exc:
        log.error("%s", exc)
        raise typer.Exit(ExitCode.LISTEN) from None
    except OSError as exc:
        log.error("cannot start %s: %s", stage, exc)
        raise typer.Exit(ExitCode.FAILURE) from None
    raise typer.Exit(code)


def _stage_problem(stage: str, cfg: Config) -> str | None:
    """What keeps ``stage`` from running with ``cfg``, beyond what every stage checks: the config problem."""
    if stage == "dispatch" and not cfg.backends:
        return (
            "backends: none configured, and a dispatcher needs one (the config's backends, or LLMQ_BACKENDS; "
            "llmq-stage up runs a mock backend when none is configured)"
        )
    key_file = cfg.server.api_keys_file
    if stage == "ingest" and key_file is not None:
        try:
            read_key_file(key_file, cfg.keys_with_tenants)
        except (OSError, UnicodeDecodeError) as exc:  # (only the ingest reads it: the others need not see it)
            return f"server.api_keys_file: cannot read {key_file}: {exc.__class__.__name__}"
        except ValueError as exc:  # the message names the line, never its words (a key)
            return f"server.api_keys_file: {key_file}: {exc}"
    return None


def _postgres_answers(cfg: Config, timeout_s: float) -> bool:
    try:
        asyncio.run(wait_for_postgres(postgres_of(cfg), timeout_s=timeout_s))
    except ConnectError as exc:
        log.error("%s", exc)
        return False
    return True


async def _serve_ingest(cfg: Config, port: int, handler: logging.Handler, connect_timeout_s: float) -> ExitCode:
    from llmq.stages.ingest import create_app

    redis = make_redis(cfg.redis)
    try:
        try:
            await wait_for_redis(redis, cfg.redis, timeout_s=connect_timeout_s)
        except ConnectError as exc:
            log.error("%s", exc)
            return ExitCode.CONNECT
        # The archive (status of messages whose Redis hash expired) and a health check, when configured.
        pool = make_pool(cfg.database.postgres, max_size=4) if cfg.database.postgres else None
        api = create_app(cfg, redis=redis, keys=Keys(cfg.redis.key_prefix), pool=pool)
        server = uvicorn.Server(_http_config(api, cfg, port))
        # uvicorn owns SIGINT/SIGTERM here and re-raises the signal after its graceful shutdown; with
        # these no-op handlers in place that re-raise does not kill the process, so it exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, reopen_logs, handler)
        # Bound before "listening" is logged, so the line is true when it appears (and names the port
        # that --port 0 picked).
        sock = listen(cfg.server.host, port)
        port = sock.getsockname()[1]
        log.info("ingest listening on http://%s:%d (redis %s)", cfg.server.host, port, describe(cfg.redis))
        await server.serve(sockets=[sock])
        if not server.started:
            return ExitCode.FAILURE
        log.info("ingest stopped")
        return ExitCode.OK
    finally:
        await redis.aclose()


def _http_config(app: Any, cfg: Config, port: int) -> uvicorn.Config:
    """uvicorn settings of the HTTP stages. Shutdown is bounded by the grace period: left alone, uvicorn
    waits for every open client connection to close."""
    return uvicorn.Config(
        app,
        host=cfg.server.host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(cfg.queue.worker.shutdown_grace.seconds)),
    )


async def _serve_mock(cfg: Config, port: int, settings: MockSettings, handler: logging.Handler) -> ExitCode:
    server = uvicorn.Server(_http_config(MockBackend(settings).app(), cfg, port))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # see _serve_ingest
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, reopen_logs, handler)
    sock = listen(cfg.server.host, port)
    log.info("mock backend listening on http://%s:%d/v1", cfg.server.host, sock.getsockname()[1])
    await server.serve(sockets=[sock])
    return ExitCode.OK if server.started else ExitCode.FAILURE


def _parse_scale(values: list[str]) -> dict[str, int]:
    scale: dict[str, int] = {}
    for item in values:
        name, _, count = item.partition("=")
        if name not in STAGES or not (count.isascii() and count.isdigit()) or int(count) < 0:
            raise typer.BadParameter(f"{item!r}: expected STAGE=N with STAGE one of {', '.join(STAGES)}")
        scale[name] = int(count)
    return scale


@app.command(epilog="Examples:\n\n  llmq-stage up\n\n  llmq-stage up --config configs/config.yaml --scale dispatch=4")
def up(
    config: ConfigOption = None,
    scale: Annotated[
        list[str] | None, typer.Option(help="Processes per stage, e.g. --scale dispatch=4 (repeatable).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the embedded servers keep their data (survives restarts). Default: $LLMQ_HOME, else "
            ".llmq; the commands run beside up (status, dlq, pause) find its servers there.",
            show_default=False,
        ),
    ] = None,
    mock_port: Annotated[
        int, typer.Option(help="Port of the mock backend started when no backend is configured.")
    ] = MOCK_BACKEND_PORT,
    host: Annotated[
        str | None,
        typer.Option(
            help="Address the API and the stages' ops ports bind, e.g. 0.0.0.0 for every interface. "
            "Default: server.host when the config file or LLMQ_SERVER__HOST sets it, else 127.0.0.1.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the whole queue: every stage as its own process under one supervisor.

    With no Redis configured (database.redis or LLMQ_REDIS_URL) an embedded Valkey is started; with no
    Postgres configured (database.postgres or LLMQ_DATABASE_URL) an embedded PostgreSQL; both on free
    ports with data under --data-dir. Only this machine reaches the API and the ops ports unless --host or
    server.host says otherwise. Crashed stages restart with backoff; SIGTERM/Ctrl-C stops all.
    """
    loaded = read_or_exit(config)
    cfg = loaded.config
    counts = {name: 1 for name, spec in STAGES.items() if spec.in_up} | _parse_scale(scale or [])
    setup_logging(cfg.logging, stage="supervisor")
    bind = host or (cfg.server.host if "server.host" in loaded.given else "127.0.0.1")
    env_overrides = {"LLMQ_SERVER__HOST": bind}
    servers: list[EmbeddedRedis | EmbeddedPostgres] = []
    data_dir = (data_dir or beside_up.home(os.environ)).resolve()
    try:
        if cfg.database.redis is None:
            redis_server = EmbeddedRedis(data_dir / "valkey")
            servers.append(redis_server)
            env_overrides["LLMQ_REDIS_URL"] = redis_server.start()
            typer.echo(f"embedded Redis (valkey) listening on {env_overrides['LLMQ_REDIS_URL']}", err=True)
        if cfg.database.postgres is None:
            pg_server = EmbeddedPostgres(data_dir / "postgres")
            servers.append(pg_server)
            env_overrides["LLMQ_DATABASE_URL"] = pg_server.start()
            typer.echo(f"embedded PostgreSQL listening on {env_overrides['LLMQ_DATABASE_URL']}", err=True)
    except EmbeddedError as exc:
        typer.echo(f"error: {exc}", err=True)
        _stop_servers(servers)
        raise typer.Exit(ExitCode.EMBEDDED) from None
    if config is not None:
        env_overrides["CONFIG_PATH"] = str(config.resolve())
    children = []
    if not cfg.backends:
        # No backend configured: a mock one, so a new user sees messages complete.
        mock_url = f"http://{_display_host(bind)}:{mock_port}/v1"
        env_overrides["LLMQ_BACKENDS"] = f'[{{name: mock, url: "{mock_url}", max_concurrent: 64}}]'
        children.append(
            Child(name="mock-backend", argv=stage_argv("mock-backend", "--port", str(mock_port), "--latency-ms", "200"))
        )
        typer.echo(f"no backend configured: mock backend on {mock_url}", err=True)
    for name, count in counts.items():
        for i in range(count):
            extra = [] if i == 0 else ["--port", "0"]
            children.append(Child(name=f"{name}-{i + 1}" if count > 1 else name, argv=stage_argv(name, *extra)))
    supervisor = Supervisor(children, env=child_env(env_overrides), grace_s=cfg.queue.worker.shutdown_grace.seconds)

    def ready() -> None:
        typer.echo(
            f"llmq is up: dashboard http://{_display_host(bind)}:{cfg.server.port}/ (the API on the same port) — "
            f"{len(children)} stage processes; Ctrl-C to stop",
            err=True,
        )

    shared = {k: v for k, v in env_overrides.items() if k in ("LLMQ_REDIS_URL", "LLMQ_DATABASE_URL", "CONFIG_PATH")}
    data_dir.mkdir(parents=True, exist_ok=True)
    servers_record = beside_up.record(data_dir, shared)
    try:
        code = asyncio.run(supervisor.run(on_ready=ready))
    finally:
        beside_up.forget(servers_record)
        _stop_servers(servers)
    typer.echo("llmq stopped", err=True)
    raise typer.Exit(code)


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _stop_servers(servers: list[EmbeddedRedis | EmbeddedPostgres]) -> None:
    for server in reversed(servers):
        try:
            server.stop()
        except Exception as exc:  # a loop boundary of sorts: stop every server even if one fails
            log.error("could not stop an embedded server: %s", exc)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show each level's depth, pending, in-flight, consumers and oldest message age (and, on stderr, which
    Redis it read)."""
    cfg = load_beside_up(config)
    rows = on_redis(cfg, config, lambda redis, keys: level_status(redis, keys, cfg))
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    header = (
        f"{'LEVEL':<12}{'PRIO':>5}{'DEPTH':>9}{'PENDING':>9}{'INFLIGHT':>10}{'CONSUMERS':>11}{'OLDEST':>10}"
        f"{'MAX':>9}{'SLO':>9}{'PAUSED':>8}"
    )
    typer.echo(header)
    for r in rows:
        oldest = "-" if r.oldest_age_s is None else f"{r.oldest_age_s:.1f}s"
        typer.echo(
            f"{r.level:<12}{r.priority:>5}{r.depth:>9}{r.pending:>9}{r.inflight:>10}{r.consumers:>11}"
            f"{oldest:>10}{r.max_size:>9}{r.max_wait_time_s:>8g}s{'yes' if r.paused else '-':>8}"
        )


@config_app.command("validate")
def config_validate(
    path: Annotated[Path | None, typer.Argument(help="Config file. Default: $CONFIG_PATH.", show_default=False)] = None,
) -> None:
    """Check a config file: print every error with its path and exit 3, or a one-line summary and exit 0
    (after a line for each warning: fields that do nothing, a shutdown grace shorter than a call)."""
    if path is None and not os.environ.get("CONFIG_PATH"):
        typer.echo("error: give a PATH or set CONFIG_PATH", err=True)
        raise typer.Exit(ExitCode.USAGE)
    loaded = read_or_exit(path)
    cfg = loaded.config
    for warning in loaded.warnings:
        typer.echo(f"warning: {warning}", err=True)
    levels = ", ".join(f"{lv.name}({lv.max_wait_time})" for lv in sorted(cfg.queue.levels, key=lambda x: x.priority))
    typer.echo(
        f"ok: {path or os.environ['CONFIG_PATH']}: {len(cfg.queue.levels)} levels [{levels}], "
        f"{len(cfg.backends)} backends, strategy {cfg.scheduler.strategy}, lb {cfg.loadbalancer.algorithm}"
    )


@db_app.command("migrate")
def db_migrate(
    config: ConfigOption = None,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to keep retrying PostgreSQL.")] = 30.0,
) -> None:
    """Apply the schema migrations not yet applied (safe to run from several replicas at once, and again)."""
    cfg = load_or_exit(config)
    pg = postgres_of(cfg)

    async def run_migrations() -> list[int]:
        await wait_for_postgres(pg, timeout_s=connect_timeout)
        return await migrate(pg.conninfo)

    try:
        applied = asyncio.run(run_migrations())
    except ConnectError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.CONNECT) from None
    where = describe_postgres(pg)
    if applied:
        typer.echo(f"applied migrations {', '.join(f'{v:04d}' for v in applied)} to {where}")
    else:
        typer.echo(f"schema of {where} is up to date")


def main() -> None:
    app(prog_name="llmq-stage")


if __name__ == "__main__":
    main()
