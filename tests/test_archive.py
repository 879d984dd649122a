"""archive, migrations, trimming and dead letters on real Redis and real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from llmq.cli.consume import runner_settings
from llmq.cli.embedded import EmbeddedPostgres
from llmq.cli.stages import make_archive
from llmq.pipeline.config import load_config
from llmq.pipeline.db import migrate, migrations
from llmq.pipeline.dlq import DeadLetters
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, Message, Outcome, Status, encode, new_id
from llmq.pipeline.runtime.runner import Runner
from llmq.stages.archive.rows import COLUMNS, copy_rows
from llmq.stages.archive.trim import trim_acked
from tests.conftest import eventually
from tests.support.archive import status_in_db
from tests.support.procs import ROOT, llmq_stage
from tests.support.settle import archived_rows


def outcome(i: int, status: Status = Status.COMPLETED) -> Outcome:
    now = time.time()
    msg = Message(
        id=new_id(),
        level="normal",
        request={"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]},
        tenant="acme",
        session_id=f"s{i % 3}",
        enqueued_at=now - 2,
        attempts=1,
    )
    return Outcome(
        message=msg,
        status=status,
        backend="a",
        response={"choices": [{"message": {"content": f"a{i}"}}]},
        started_at=now - 1,
        finished_at=now,
        prompt_tokens=10,
        completion_tokens=5,
    )


async def push(redis: aioredis.Redis, keys: Keys, outcomes: list[Outcome]) -> None:
    pipe = redis.pipeline(transaction=False)
    for o in outcomes:
        pipe.xadd(keys.done, {FIELD: encode(o)})
    await pipe.execute()


@contextlib.asynccontextmanager
async def archiving(redis: aioredis.Redis, keys: Keys, dsn: str, **env: str) -> AsyncIterator[Any]:
    """An archive stage running in this process for the block; it yields the stage."""
    config = load_config(None, env={"LLMQ_DATABASE_URL": dsn, "LLMQ_KEY_PREFIX": keys.prefix, **env})
    stage = make_archive(config=config, redis=redis, keys=keys)
    runner = Runner(stage, redis=redis, keys=keys, consumer="a1", settings=runner_settings(config))
    await stage.start()
    task = asyncio.create_task(runner.run())
    try:
        yield stage
    finally:
        runner.stop()
        await task
        await stage.close()


async def test_outcomes_become_rows_once_each(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    # Given 250 outcomes in the done stream
    outcomes = [outcome(i) for i in range(250)]
    await push(redis, keys, outcomes)
    async with archiving(redis, keys, database_url):
        # When the archive runs, then there is exactly one row per outcome, with its fields
        await eventually(lambda: _rows_are(database_url, 250), what="250 rows")
        # and redelivering the same outcomes upserts the same rows
        await push(redis, keys, outcomes[:50])
        await eventually(lambda: _pending_zero_and_read(redis, keys, 300), what="redelivery handled")
        assert await archived_rows(database_url) == 250
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT level, status, tenant, backend, model, attempts, request, response, prompt_tokens,"
            " completion_tokens, round(queue_wait_ms), round(latency_ms) FROM messages WHERE id = %s",
            (outcomes[7].message.id,),
        )
        row = await cur.fetchone()
    assert row is not None
    assert row[:6] == ("normal", "completed", "acme", "a", "m", 1)
    assert row[6]["messages"][0]["content"] == "q7" and row[7]["choices"][0]["message"]["content"] == "a7"
    assert row[8:10] == (10, 5)
    assert 990 <= row[10] <= 1010 and 990 <= row[11] <= 1010


async def _rows_are(dsn: str, n: int) -> bool:
    return await archived_rows(dsn) == n


async def _pending_zero_and_read(redis: aioredis.Redis, keys: Keys, n: int) -> bool:
    groups: Any = await redis.xinfo_groups(keys.done)
    if not groups:  # the archive has not created its group yet
        return False
    g = groups[0]
    return int(g["pending"]) == 0 and int(g["entries-read"] or 0) >= n


async def test_bodies_can_be_left_out(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    await push(redis, keys, [outcome(1)])
    async with archiving(redis, keys, database_url, LLMQ_DATABASE__POSTGRES__STORE_BODIES="false"):
        await eventually(lambda: _rows_are(database_url, 1), what="1 row")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        row = await (await conn.execute("SELECT request, response, prompt_tokens FROM messages")).fetchone()
    assert row == (None, None, 10)


HOSTILE = 'tab\t newline\n return\r backslash\\ quote" nul\x00 escaped \\u0000 é 漢 🎉 \\N'


async def test_any_text_survives_the_copy_format(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    # Given an outcome whose every text field carries COPY's special characters, a NUL and non-ASCII text
    o = outcome(1, Status.FAILED)
    o.message.tenant, o.message.session_id, o.error = HOSTILE, HOSTILE[::-1], HOSTILE
    o.message.request["messages"][0]["content"] = HOSTILE
    o.message.request["model"] = HOSTILE
    o.response = {"detail": HOSTILE, "nested": [HOSTILE, {"k\t": 1.5}]}
    o.started_at = None
    await push(redis, keys, [o])
    async with archiving(redis, keys, database_url):
        await eventually(lambda: _rows_are(database_url, 1), what="1 row")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT tenant, session_id, error, model, request, response, enqueued_at, started_at, finished_at,"
            " queue_wait_ms FROM messages"
        )
        row = await cur.fetchone()
    # Then the row holds the same text, with the NUL (which PostgreSQL cannot store) as U+FFFD
    stored = HOSTILE.replace("\x00", "\ufffd")
    assert row is not None
    assert row[:4] == (stored, stored[::-1], stored, stored)
    assert row[4]["messages"][0]["content"] == stored
    assert row[5] == {"detail": stored, "nested": [stored, {"k\t": 1.5}]}
    # and the timestamps to the microsecond
    assert row[6].timestamp() == pytest.approx(o.message.enqueued_at, abs=1e-6)
    assert row[7] is None and row[9] is None
    assert row[8].timestamp() == pytest.approx(o.finished_at, abs=1e-6)


async def test_a_row_postgresql_refuses_is_dead_lettered_alone_and_archives_once_fixed(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given token counts that are still integer columns (as before migration 0002)
    await migrate(database_url)
    await _sql(
        database_url, "ALTER TABLE messages ALTER prompt_tokens TYPE integer, ALTER completion_tokens TYPE integer"
    )
    # and one batch of 50 outcomes, two of whose backends counted past integer
    outcomes = [outcome(i) for i in range(50)]
    outcomes[7].prompt_tokens = 3_000_000_000
    outcomes[31].completion_tokens = 2**40
    bad = {outcomes[7].message.id: "3000000000", outcomes[31].message.id: "1099511627776"}
    poison_before = _poison("archive")
    await push(redis, keys, outcomes)
    async with archiving(redis, keys, database_url):
        # When the archive has settled the batch
        await eventually(lambda: _pending_zero_and_read(redis, keys, 50), what="batch settled")
        # Then the 48 other rows are archived
        assert await archived_rows(database_url) == 48
        # and each refused row is a dead letter of its own, with PostgreSQL's reason
        dlq = DeadLetters(redis=redis, keys=keys, config=load_config(None, env={}))
        dead = await dlq.list()
        assert {d.message_id: d.reason for d in dead} == {
            mid: f'refused by PostgreSQL: value "{value}" is out of range for type integer'
            for mid, value in bad.items()
        }
        entries: Any = await redis.xrange(keys.dlq)
        assert all(f[b"stream"] == keys.done.encode() and f[b"group"] == b"archive" for _, f in entries)
        assert _poison("archive") - poison_before == 2
        # When the columns are widened and the dead letters replayed
        await _sql(
            database_url, "ALTER TABLE messages ALTER prompt_tokens TYPE bigint, ALTER completion_tokens TYPE bigint"
        )
        assert all([await dlq.replay(d) for d in dead])
        # Then those rows archive too, with their counts
        await eventually(lambda: _rows_are(database_url, 50), what="50 rows after the replay")
        await eventually(lambda: _pending_zero_and_read(redis, keys, 52), what="replayed outcomes settled")
    assert await dlq.count() == 0
    assert await _tokens(database_url, outcomes[7].message.id) == (3_000_000_000, 5)
    assert await _tokens(database_url, outcomes[31].message.id) == (10, 2**40)


async def test_token_counts_past_integer_archive_and_past_bigint_become_null(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given a backend that counted 3e9 prompt tokens and 2**64 - 1 completion tokens (the most msgpack carries)
    big = outcome(1)
    big.prompt_tokens, big.completion_tokens = 3_000_000_000, 2**64 - 1
    with pytest.raises(OverflowError):
        encode(2**64)  # nothing larger reaches the archive
    await push(redis, keys, [big, outcome(2)])
    async with archiving(redis, keys, database_url):
        # When the archive runs
        await eventually(lambda: _rows_are(database_url, 2), what="2 rows")
    # Then the count past integer is stored, the one past bigint is NULL, and nothing is dead-lettered
    assert await _tokens(database_url, big.message.id) == (3_000_000_000, None)
    assert await redis.xlen(keys.dlq) == 0


async def test_rows_are_formatted_storable_whatever_they_hold(database_url: str) -> None:
    # Given an outcome with lone surrogates in text and JSON (which msgpack cannot carry to the archive, but
    # formatting must not raise all the same), and token counts just past and at bigint's ends
    o = outcome(1)
    o.message.tenant, o.error = "a\ud800b", "\udfff"
    o.response = {"k\udc00": ["x\ud83c", "🎉"]}
    o.prompt_tokens, o.completion_tokens = 2**63, -(2**63)
    # When its row is formatted and copied into the table
    rows = copy_rows([o], store_bodies=True)
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        async with conn.cursor().copy(f"COPY messages ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            await copy.write(rows)
        await conn.commit()
        cur = await conn.execute("SELECT tenant, error, response, prompt_tokens, completion_tokens FROM messages")
        row = await cur.fetchone()
    # Then PostgreSQL takes it: each lone surrogate as U+FFFD, a pair intact, the count past bigint as NULL
    assert row == ("a\ufffdb", "\ufffd", {"k\ufffd": ["x\ufffd", "🎉"]}, None, -(2**63))


async def test_an_entry_that_is_not_an_outcome_is_dead_lettered_alone(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given a batch with an entry that does not decode as an outcome between two that do
    await push(redis, keys, [outcome(1)])
    await redis.xadd(keys.done, {FIELD: b"\x93not an outcome"})
    await push(redis, keys, [outcome(2)])
    async with archiving(redis, keys, database_url):
        # When the archive has settled it
        await eventually(lambda: _pending_zero_and_read(redis, keys, 3), what="batch settled")
        # Then the two outcomes are archived and the other entry is a dead letter, saying why
        assert await archived_rows(database_url) == 2
        dead: Any = await redis.xrange(keys.dlq)
    [(_, fields)] = dead
    assert fields[FIELD] == b"\x93not an outcome" and fields[b"reason"].startswith(b"not an outcome: ")


async def test_an_older_outcome_never_overwrites_a_newer_row(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given message A archived dead at t1, then completed at t2 (its dead letter was replayed)
    completed = outcome(1)
    dead = msgspec.structs.replace(
        completed, status=Status.DEAD, response=None, error="poison", finished_at=completed.finished_at - 60
    )
    mid = completed.message.id
    # and message B, completed at t2 and dead at t1, whose outcomes come in one batch, the newer first
    b_completed = outcome(2)
    b_dead = msgspec.structs.replace(b_completed, status=Status.DEAD, finished_at=b_completed.finished_at - 60)
    await push(redis, keys, [dead, b_completed, b_dead])
    async with archiving(redis, keys, database_url):
        await eventually(lambda: status_in_db(database_url, mid, "dead"), what="A dead")
        await push(redis, keys, [completed])
        await eventually(lambda: status_in_db(database_url, mid, "completed"), what="A completed")
        # When A's dead outcome is delivered again
        await push(redis, keys, [dead])
        await eventually(lambda: _pending_zero_and_read(redis, keys, 5), what="redelivery handled")
    # Then both rows hold their newest outcome: completed
    assert await status_in_db(database_url, mid, "completed")
    assert await status_in_db(database_url, b_completed.message.id, "completed")


def _poison(stage: str) -> float:
    return REGISTRY.get_sample_value("llmq_poison_total", {"stage": stage}) or 0.0


async def _sql(dsn: str, statement: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(statement.encode())


async def _tokens(dsn: str, mid: str) -> tuple[Any, ...] | None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT prompt_tokens, completion_tokens FROM messages WHERE id = %s", (mid,))
        return await cur.fetchone()


async def test_migrations_are_idempotent_and_safe_concurrently(database_url: str) -> None:
    results = await asyncio.gather(*(migrate(database_url) for _ in range(4)))
    assert sorted(v for r in results for v in r) == [m.version for m in migrations()]
    assert await migrate(database_url) == []
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        versions = await (await conn.execute("SELECT version FROM llmq_schema_migrations ORDER BY 1")).fetchall()
    assert versions == [(m.version,) for m in migrations()]


def test_db_migrate_command(database_url: str, stage_env: dict[str, str]) -> None:
    env = {**stage_env, "LLMQ_DATABASE_URL": database_url}
    run = [sys.executable, "-m", "llmq.cli", "db", "migrate"]
    first = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    second = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    applied = ", ".join(f"{m.version:04d}" for m in migrations())
    assert first.returncode == 0 and f"applied migrations {applied}" in first.stdout, first.stderr
    assert second.returncode == 0 and "is up to date" in second.stdout


async def test_db_purge_deletes_the_rows_older_than_the_retention_and_nothing_else(
    database_url: str, stage_env: dict[str, str]
) -> None:
    # Given 12 archived messages, finished 1 to 12 days ago
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for day in range(1, 13):
            await conn.execute(
                "INSERT INTO messages (id, level, status, enqueued_at, finished_at)"
                " VALUES (%s, 'low', 'completed', now(), now() - make_interval(days => %s))",
                (str(uuid.uuid4()), day),
            )
    env = {**stage_env, "LLMQ_DATABASE_URL": database_url}

    def purge(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "llmq.cli", "db", "purge", *args]
        return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    # When a dry run, then a purge of what is older than 7 days (in batches of 2) runs
    dry = purge("--older-than", "7d12h", "--dry-run")
    done = purge("--older-than", "7d12h", "--batch-size", "2")
    # Then the dry run deleted nothing, the purge the 5 older rows, and the newer 7 are there
    assert dry.returncode == 0 and "would delete 5 messages" in dry.stdout, dry.stderr
    assert done.returncode == 0 and "deleted 5 messages" in done.stdout, done.stderr
    assert await archived_rows(database_url) == 7
    # A retention that would delete everything, or none given, is refused naming the option
    for bad in (["--older-than", "0s"], ["--older-than", "a week"]):
        refused = purge(*bad)
        assert refused.returncode == 2 and "--older-than" in refused.stderr
    assert await archived_rows(database_url) == 7


async def test_sigkilled_archiver_loses_and_duplicates_nothing(
    redis: aioredis.Redis, keys: Keys, database_url: str, stage_env: dict[str, str]
) -> None:
    # Given 6000 outcomes and an archiver process
    n = 6000
    await push(redis, keys, [outcome(i) for i in range(n)])
    env = {**stage_env, "LLMQ_DATABASE_URL": database_url, "LLMQ_QUEUE__WORKER__MAX_BATCH_SIZE": "200"}
    first = llmq_stage(env, "run", "archive", "--port", "0")
    try:
        # When it is SIGKILLed part-way through
        await eventually(lambda: _rows_at_least(database_url, 1), within=60, what="archiving started")
        first.kill()
        assert await archived_rows(database_url) < n
        # Then a new archiver finishes the job: every outcome exactly once
        second = llmq_stage(env, "run", "archive", "--port", "0")
        try:
            await eventually(lambda: _rows_are(database_url, n), within=60, what=f"{n} rows")
            second.signal(signal.SIGTERM)
            assert second.wait() == 0
        finally:
            second.kill()
    finally:
        first.kill()


async def _rows_at_least(dsn: str, n: int) -> bool:
    return await archived_rows(dsn) >= n


@pytest.mark.timeout(120)
async def test_postgres_outage_loses_nothing_and_reports_degraded(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an archive on a PostgreSQL of this test's own (so it can be stopped)
    # (not tmp_path: a unix socket's path must stay under 108 bytes)
    data = Path(tempfile.mkdtemp(prefix="llmq-outage-"))
    server = EmbeddedPostgres(data / "pg")
    dsn = server.start()
    try:
        async with archiving(redis, keys, dsn) as stage:
            await push(redis, keys, [outcome(i) for i in range(10)])
            await eventually(lambda: _rows_are(dsn, 10), what="10 rows before the outage")
            # When PostgreSQL stops and outcomes keep coming
            server.stop()
            await push(redis, keys, [outcome(i) for i in range(10, 60)])
            await eventually(lambda: _degraded(stage), within=30, what="health degraded")
            # Then nothing is acked meanwhile: each of the 50 is pending or not yet delivered
            groups: Any = await redis.xinfo_groups(keys.done)
            [group] = groups
            undelivered = await redis.xrange(keys.done, min=f"({group['last-delivered-id'].decode()}")
            assert int(group["pending"]) + len(undelivered) == 50
            # and when it comes back, everything lands and health recovers
            assert server.start() == dsn
            await eventually(lambda: _rows_are(dsn, 60), within=40, what="60 rows after the outage")
            assert (await stage.health()) == {"postgres": "ok"}
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


async def _degraded(stage: Any) -> bool:
    return bool((await stage.health()) == {"postgres": "degraded"})


async def test_trimming_never_removes_an_unacked_entry(redis: aioredis.Redis, keys: Keys) -> None:
    # Given 10 entries read by group g, of which 4 and 5 are still pending, and a group h that read 8
    stream = keys.level("normal")
    ids = [await redis.xadd(stream, {FIELD: f"e{i}"}) for i in range(1, 11)]
    await redis.xgroup_create(stream, "g", id="0")
    await redis.xgroup_create(stream, "h", id="0")
    await redis.xreadgroup("g", "c", {stream: ">"}, count=10)
    await redis.xack(stream, "g", *ids[:3], *ids[5:])
    await redis.xreadgroup("h", "c", {stream: ">"}, count=8)
    await redis.xack(stream, "h", *ids[:8])
    # (a naive XTRIM MAXLEN 5 would delete entries 1-5, two of them pending)
    # When the stream is trimmed
    removed = await trim_acked(redis, stream)
    # Then only 1-3 are gone: 4 and 5 are pending in g
    left = [eid for eid, _ in await redis.xrange(stream)]
    assert removed == 3 and left == ids[3:]
    # and once g acks them, trimming stops at what h has not read (entries 9, 10)
    await redis.xack(stream, "g", ids[3], ids[4])
    assert await trim_acked(redis, stream) == 5
    assert [eid for eid, _ in await redis.xrange(stream)] == ids[8:]


async def test_a_stream_without_groups_is_not_trimmed(redis: aioredis.Redis, keys: Keys) -> None:
    await redis.xadd(keys.dispatch, {FIELD: "x"})
    assert await trim_acked(redis, keys.dispatch) == 0
    assert await redis.xlen(keys.dispatch) == 1


async def test_an_archived_message_stays_in_redis_only_for_the_window(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given finished messages whose status hashes are kept a day (queue.result_retention) until archived, and
    # one of them replayed since (live again, with no TTL)
    outcomes = [outcome(i) for i in range(3)]
    for o in outcomes:
        await redis.hset(keys.msg(o.message.id), mapping={"status": "completed"})
        await redis.expire(keys.msg(o.message.id), 24 * 3600)
    await redis.hset(keys.msg(outcomes[2].message.id), "status", "queued")
    await redis.persist(keys.msg(outcomes[2].message.id))
    await push(redis, keys, outcomes)
    # When the archive commits their rows (a window of 30 s)
    async with archiving(redis, keys, database_url, LLMQ_QUEUE__ARCHIVED_RETENTION="30s"):
        await eventually(lambda: _rows_are(database_url, 3), what="3 rows")
        await eventually(lambda: _pending_zero_and_read(redis, keys, 3), what="acked")
    # Then the finished ones stay in Redis 30 s more, not a day; the live one keeps no TTL
    for o in outcomes[:2]:
        assert 0 < await redis.ttl(keys.msg(o.message.id)) <= 30
    assert await redis.ttl(keys.msg(outcomes[2].message.id)) == -1


async def test_a_trim_point_is_found_when_the_pending_entries_were_acked_meanwhile(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a group that had pending entries when XINFO answered, all acked by the time XPENDING answers
    stream = keys.done
    await redis.xgroup_create(stream, "archive", id="0", mkstream=True)
    for i in range(3):
        await redis.xadd(stream, {FIELD: f"{i}"})
    read: Any = await redis.xreadgroup("archive", "a1", {stream: ">"}, count=3)
    xinfo = redis.xinfo_groups

    async def then_acked(name: str) -> Any:
        groups = await xinfo(name)
        await redis.xack(stream, "archive", *(eid for eid, _ in read[0][1]))
        return groups

    monkeypatch.setattr(redis, "xinfo_groups", then_acked)
    # When it is trimmed, then the acked entries go (it raised ValueError on XPENDING's empty summary)
    assert await trim_acked(redis, stream) == 3
