"""``llmq-stage dlq``: inspect, replay and purge dead letters."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec
import typer

from llmq.cli.common import ConfigOption, load_beside_up, on_redis
from llmq.cli.exit_codes import ExitCode
from llmq.pipeline.config.durations import parse_duration
from llmq.pipeline.dlq import DeadLetter, DeadLetters, NotReplayable

dlq_app = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)

T = TypeVar("T")


def _run(config: Path | None, work: Callable[[DeadLetters], Awaitable[T]]) -> T:
    cfg = load_beside_up(config)
    return on_redis(cfg, config, lambda redis, keys: work(DeadLetters(redis=redis, keys=keys, config=cfg)))


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(text: str, option: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise typer.BadParameter(f'{option}: invalid duration "{text}" (e.g. "30m", "24h", "7d")') from None


@dlq_app.command("list", epilog="Example: llmq-stage dlq list --since 24h --limit 20")
def list_(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 50,
    since: Annotated[str | None, typer.Option(help='Only those dead-lettered within this long, e.g. "24h".')] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List dead letters."""
    since_ts = time.time() - _duration(since, "--since") if since else None
    rows = _run(config, lambda d: d.list(limit=limit, since=since_ts))
    if as_json:
        for dl in rows:
            typer.echo(msgspec.json.encode(dl.summary()).decode())
        return
    typer.echo(f"{'ENTRY':<17} {'WHEN (UTC)':<19} {'MESSAGE':<36} {'LEVEL':<9} REASON")
    for dl in rows:
        typer.echo(f"{dl.entry_id:<17} {_when(dl.at)} {dl.message_id or '-':<36} {_level(dl):<9} {dl.reason}")
    typer.echo(f"{len(rows)} dead letters shown")


def _level(dl: DeadLetter) -> str:
    return dl.message.level if dl.message else "-"


@dlq_app.command("show")
def show(
    ident: Annotated[str, typer.Argument(help="Dead-letter entry id or message id.")], config: ConfigOption = None
) -> None:
    """Show one dead letter with every attempt's error."""
    dl = _run(config, lambda d: d.find(ident))
    if dl is None:
        typer.echo(f"error: no dead letter {ident!r}", err=True)
        raise typer.Exit(ExitCode.FAILURE)
    doc = dl.summary() | {"request": dl.message.request if dl.message else None}
    typer.echo(msgspec.json.format(msgspec.json.encode(doc)).decode())


@dlq_app.command(
    "replay", epilog="Examples:\n\n  llmq-stage dlq replay 01a2…-uuid\n\n  llmq-stage dlq replay --all --level low"
)
def replay(
    ident: Annotated[str | None, typer.Argument(help="Dead-letter entry id or message id.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    level: Annotated[str | None, typer.Option(help="Put the messages in this level instead of their own.")] = None,
    config: ConfigOption = None,
) -> None:
    """Put dead messages back in their level stream with attempts reset. Replaying twice does not duplicate."""
    if bool(ident) == all_:
        typer.echo("error: give one ID or --all", err=True)
        raise typer.Exit(ExitCode.USAGE)

    async def work(d: DeadLetters) -> tuple[int, int]:
        targets = [x for x in [await d.find(ident)] if x] if ident else await d.list(limit=1_000_000)
        replayed = 0
        for dl in targets:
            try:
                replayed += await d.replay(dl, level=level)
            except NotReplayable as exc:
                if ident:
                    raise
                typer.echo(f"skipped: {exc}", err=True)  # (--all goes on past it)
        return replayed, len(targets)

    try:
        replayed, found = _run(config, work)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.USAGE) from None
    if ident and not found:
        typer.echo(f"error: no dead letter {ident!r} (already replayed?)", err=True)
        raise typer.Exit(ExitCode.FAILURE)
    typer.echo(f"replayed {replayed} of {found} dead letters")


@dlq_app.command("purge", epilog="Example: llmq-stage dlq purge --older-than 7d")
def purge(
    older_than: Annotated[str, typer.Option(help='Delete dead letters older than this, e.g. "7d".')],
    config: ConfigOption = None,
) -> None:
    """Delete old dead letters (their outcome stays in PostgreSQL as "dead")."""
    seconds = _duration(older_than, "--older-than")
    deleted = _run(config, lambda d: d.purge(older_than_s=seconds))
    typer.echo(f"purged {deleted} dead letters older than {older_than}")
