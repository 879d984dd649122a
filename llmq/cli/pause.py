"""``llmq-stage pause`` and ``resume``: stop and restart admission of some levels, or of the whole queue,
before maintenance (``llmq.pipeline.pausing``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import redis.asyncio as aioredis
import typer

from llmq.cli.common import ConfigOption, load_beside_up, on_redis
from llmq.cli.exit_codes import ExitCode
from llmq.pipeline import pausing
from llmq.pipeline.config import Config
from llmq.pipeline.keys import Keys

Levels = Annotated[
    list[str] | None, typer.Argument(help="Levels (as named in the config). None: give --all.", show_default=False)
]
All = Annotated[bool, typer.Option("--all", help="The whole queue: every level, and any added later.")]


def pause(
    levels: Levels = None,
    every: All = False,
    reason: Annotated[str, typer.Option(help="Why, shown by status and resume.")] = "",
    config: ConfigOption = None,
) -> None:
    """Stop admitting messages of LEVELS (or --all) while messages keep queueing: calls already admitted run
    to their end. Wait until `llmq-stage status` shows no INFLIGHT before maintenance; then `resume`."""
    cfg = load_beside_up(config)
    chosen = _chosen(cfg, levels, every)
    _run(cfg, config, lambda r, k: pausing.pause(r, k, chosen, reason))


def resume(levels: Levels = None, every: All = False, config: ConfigOption = None) -> None:
    """Admit messages of LEVELS (or --all: everything paused, by level or as a whole) again."""
    cfg = load_beside_up(config)
    chosen = _chosen(cfg, levels, every)

    async def clear(r: aioredis.Redis, k: Keys) -> None:
        if every:
            await pausing.resume_all(r, k)
        else:
            await pausing.resume(r, k, chosen)

    _run(cfg, config, clear)


def _chosen(cfg: Config, levels: list[str] | None, every: bool) -> list[str]:
    known = [lv.name for lv in cfg.queue.levels]
    if every == bool(levels):
        typer.echo("error: name the levels, or give --all (not both)", err=True)
        raise typer.Exit(ExitCode.USAGE)
    unknown = [name for name in levels or [] if name not in known]
    if unknown:
        typer.echo(f"error: no level {', '.join(map(repr, unknown))}; levels: {', '.join(known)}", err=True)
        raise typer.Exit(ExitCode.USAGE)
    return [pausing.EVERY] if every else list(levels or [])


def _run(cfg: Config, path: Path | None, change: Callable[[aioredis.Redis, Keys], Awaitable[None]]) -> None:
    async def then_read(redis: aioredis.Redis, keys: Keys) -> dict[str, str]:
        await change(redis, keys)
        return await pausing.read(redis, keys)

    paused = on_redis(cfg, path, then_read)
    if not paused:
        typer.echo("admitting every level")
    for name, since in sorted(paused.items()):
        typer.echo(f"paused: {'every level' if name == pausing.EVERY else name} (since {since})")
