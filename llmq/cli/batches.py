"""``llmq-stage batches list|show|cancel``: the Batch API's batches (``llmq.pipeline.batches``), from PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import psycopg
import typer
from psycopg_pool import AsyncConnectionPool

from llmq.cli.common import ConfigOption, load_beside_up
from llmq.cli.exit_codes import ExitCode
from llmq.cli.stages import postgres_of
from llmq.pipeline import batches
from llmq.pipeline.db import describe as describe_postgres
from llmq.pipeline.db import make_pool, wait_for_postgres
from llmq.pipeline.errors import ConnectError

T = TypeVar("T")

batches_app = typer.Typer(
    help="The Batch API's batches (/v1/batches): list them, show one, cancel one.", no_args_is_help=True
)


def _on_postgres(config: ConfigOption, work: Callable[[AsyncConnectionPool], Awaitable[T]]) -> T:
    pg = postgres_of(load_beside_up(config))

    async def go() -> T:
        await wait_for_postgres(pg, timeout_s=10)
        pool = make_pool(pg, max_size=1)
        await pool.open()
        try:
            return await work(pool)
        finally:
            await pool.close()

    try:
        return asyncio.run(go())
    except ConnectError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.CONNECT) from None
    except psycopg.errors.UndefinedTable:
        typer.echo(f"error: {describe_postgres(pg)} has no batches table: run `llmq-stage db migrate`", err=True)
        raise typer.Exit(ExitCode.CONFIG) from None
    except psycopg.Error as exc:
        typer.echo(f"error: {describe_postgres(pg)}: {exc.__class__.__name__}: {exc}", err=True)
        raise typer.Exit(ExitCode.CONNECT) from None


@batches_app.command("list")
def list_batches(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    config: ConfigOption = None,
) -> None:
    """The newest batches: id, status, lines completed / failed / total, level, tenant, created."""
    found = _on_postgres(
        config, lambda pool: batches.page(pool, tenant=None, every_tenant=True, after=None, limit=limit)
    )
    typer.echo(f"{'id':<32} {'status':<11} {'done':>7} {'failed':>7} {'total':>7} {'level':<9} {'tenant':<12} created")
    for b in found:
        tenant = b.tenant if b.tenant is not None else "-"
        row = f"{b.id:<32} {b.status:<11} {b.completed:>7} {b.failed:>7} {b.total:>7} {b.level:<9} {tenant:<12}"
        typer.echo(f"{row} {b.created_at:%Y-%m-%d %H:%M:%S}")


@batches_app.command("show")
def show(
    batch_id: Annotated[str, typer.Argument(help="The batch's id (batch_...).")], config: ConfigOption = None
) -> None:
    """The batch as GET /v1/batches/{id} answers it, with how far its feeding got."""
    found = _on_postgres(config, lambda pool: batches.get(pool, batch_id))
    if found is None:
        typer.echo(f"error: no such batch: {batch_id}", err=True)
        raise typer.Exit(ExitCode.FAILURE)
    typer.echo(json.dumps(batches.batch_object(found) | {"level": found.level, "fed": found.fed}, indent=2))


@batches_app.command("cancel")
def cancel(
    batch_id: Annotated[str, typer.Argument(help="The batch's id (batch_...).")], config: ConfigOption = None
) -> None:
    """Cancel a batch: its lines not yet run are not run (those in a backend call finish); the batch stage
    writes what finished and ends it cancelled."""
    found = _on_postgres(config, lambda pool: batches.request_cancel(pool, batch_id))
    if found is None:
        typer.echo(f"error: no such batch: {batch_id}", err=True)
        raise typer.Exit(ExitCode.FAILURE)
    if found.status in batches.ENDED:
        typer.echo(f"error: batch {batch_id} has ended ({found.status}): there is nothing to cancel", err=True)
        raise typer.Exit(ExitCode.FAILURE)
    typer.echo(f"batch {batch_id}: {found.status}")
