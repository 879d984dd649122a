"""What every command shares: the --config option, loading the config or exiting with code 3, and running a
short piece of work on the configured Redis or exiting with code 4. The commands that look at the queue
(``load_beside_up``) read the one a running ``llmq-stage up`` runs when nothing names another."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated, TypeVar

import redis.asyncio as aioredis
import typer

from llmq.cli import beside_up
from llmq.cli.exit_codes import ExitCode
from llmq.pipeline.config import Config, LoadedConfig, read_config
from llmq.pipeline.errors import ConfigError, ConnectError
from llmq.pipeline.keys import Keys
from llmq.pipeline.redis import describe, make_redis, wait_for_redis

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file. Default: $CONFIG_PATH, else built-in defaults. LLMQ_* variables override it.",
        show_default=False,
    ),
]


def load_or_exit(path: Path | None) -> Config:
    """The config, or every problem printed with its path and exit code 3."""
    return read_or_exit(path).config


def load_beside_up(path: Path | None) -> Config:
    """``load_or_exit`` for a command that looks at the queue: with no config file (--config, CONFIG_PATH) and
    no Redis named in the environment (LLMQ_REDIS_URL, LLMQ_DATABASE__REDIS__*), the servers and config a
    running ``llmq-stage up`` recorded in ``$LLMQ_HOME`` (``.llmq``), if any."""
    found = _beside_up(path)
    return read_or_exit(path, {**found[0], **os.environ} if found else None).config


def _beside_up(path: Path | None) -> tuple[dict[str, str], Path] | None:
    named_redis = any(k == "LLMQ_REDIS_URL" or k.startswith("LLMQ_DATABASE__REDIS") for k in os.environ)
    if path is not None or "CONFIG_PATH" in os.environ or named_redis:
        return None
    return beside_up.recorded(os.environ)


def say_which_redis(config: Config, path: Path | None) -> None:
    """On stderr: the Redis a command reads, and where that came from, so zeros from the wrong one are not
    taken for an idle queue."""
    found = _beside_up(path)
    source = path or os.environ.get("CONFIG_PATH")
    if found:
        origin = f"the servers of the llmq-stage up running here, recorded in {found[1]}"
    elif source:
        origin = f"config {source}"
    else:
        origin = "no config file (--config or CONFIG_PATH): defaults and LLMQ_*"
    typer.echo(f"reading {describe(config.redis)}, key prefix {config.redis.key_prefix} ({origin})", err=True)


def on_redis(config: Config, path: Path | None, work: Callable[[aioredis.Redis, Keys], Awaitable[T]]) -> T:
    """Say which Redis (``say_which_redis``), then run ``work`` on it with the deployment's keys; exit code 4,
    naming it, when it does not answer within 5 s."""
    say_which_redis(config, path)

    async def go() -> T:
        redis = make_redis(config.redis)
        try:
            await wait_for_redis(redis, config.redis, timeout_s=5)
            return await work(redis, Keys(config.redis.key_prefix))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(go())
    except ConnectError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.CONNECT) from None


def read_or_exit(path: Path | None, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """``load_or_exit``, keeping which fields were given and the config's warnings (``env``: the environment
    to read, ``os.environ`` when None)."""
    try:
        return read_config(path, env)
    except ConfigError as exc:
        typer.echo(f"error: invalid configuration {exc.source}:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(ExitCode.CONFIG) from None
