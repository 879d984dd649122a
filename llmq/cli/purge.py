"""``llmq-stage db purge``: delete archived messages older than a retention (``llmq.stages.archive.retention``)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated

import psycopg
import typer

from llmq.cli.common import ConfigOption, load_beside_up
from llmq.cli.exit_codes import ExitCode
from llmq.cli.stages import postgres_of
from llmq.pipeline.config.durations import parse_duration
from llmq.pipeline.db import describe as describe_postgres
from llmq.pipeline.db import wait_for_postgres
from llmq.pipeline.errors import ConnectError
from llmq.stages.archive import retention


def purge(
    older_than: Annotated[
        str,
        typer.Option("--older-than", help='Delete the messages that finished longer ago than this: "30d", "12h".'),
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows deleted per transaction.")] = retention.BATCH,
    config: ConfigOption = None,
) -> None:
    """Delete the archived messages (rows of `messages`) that finished before now minus --older-than, in
    batches, while the archive stage runs. Run it from cron to keep a retention; see ops/README.md."""
    try:
        age_s = parse_duration(older_than)
    except ValueError as exc:
        typer.echo(f"error: --older-than: {exc}", err=True)
        raise typer.Exit(2) from None
    if age_s <= 0:
        typer.echo("error: --older-than: must be longer than 0 (it would delete every message)", err=True)
        raise typer.Exit(2)
    pg = postgres_of(load_beside_up(config))
    try:
        cutoff = datetime.now(UTC) - timedelta(seconds=age_s)
    except OverflowError:
        typer.echo(f"error: --older-than: {older_than} reaches back before the year 1", err=True)
        raise typer.Exit(2) from None

    async def go() -> int:
        await wait_for_postgres(pg, timeout_s=10)
        if dry_run:
            return await retention.count_before(pg.conninfo, cutoff)
        return await retention.purge_before(pg.conninfo, cutoff, batch=batch_size)

    try:
        n = asyncio.run(go())
    except ConnectError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.CONNECT) from None
    except psycopg.errors.UndefinedTable:
        typer.echo(f"error: {describe_postgres(pg)} has no messages table: run `llmq-stage db migrate`", err=True)
        raise typer.Exit(ExitCode.CONFIG) from None
    except psycopg.Error as exc:
        typer.echo(f"error: {describe_postgres(pg)}: {exc.__class__.__name__}: {exc}", err=True)
        raise typer.Exit(ExitCode.CONNECT) from None
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {n} messages finished before {cutoff:%Y-%m-%d %H:%M:%S} UTC from {describe_postgres(pg)}")
