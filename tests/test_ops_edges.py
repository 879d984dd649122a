"""The operations kit against what operators' setups bring (found by a hostile review of issue 22, each
failing on the code before its fix): TLS and ACL Redis URLs, a lost database restored for a user that is not
a superuser, passwords off command lines, a backup a day late, purges that cannot run, every ingest replica
scraped, a stage failing to start. Real servers only: the session's PostgreSQL and Redis fixtures, and
Valkey processes of a test's own where a test needs ACL users."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml

from llmq.pipeline.db import migrate
from tests.conftest import free_port
from tests.support.procs import ROOT, llmq_stage, stop_all
from tests.test_ops import INSERT_ROW, ROW_IDS, SCRIPTS, VALKEY_BIN, _pg_bindir

REDIS_SERVER = str(VALKEY_BIN / "valkey-server")
REDIS_CLI = str(VALKEY_BIN / "valkey-cli")


def run(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def _redis_server(data: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of this test alone, its data in ``data``, AOF on (as production runs it)."""
    argv = [REDIS_SERVER, "--dir", str(data), "--appendonly", "yes", "--save", "", "--logfile", "redis.log", *args]
    proc = subprocess.Popen(argv)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _url_of(conninfo: str, **override: str) -> str:
    """A postgresql:// URL (as the runbook writes them) for a psycopg conninfo, with fields overridden."""
    d = {**psycopg.conninfo.conninfo_to_dict(conninfo), **override}
    host = urllib.parse.quote(d.get("host") or "127.0.0.1", safe="")
    password = f":{urllib.parse.quote(d['password'], safe='')}" if d.get("password") else ""
    return f"postgresql://{d['user']}{password}@{host}:{d.get('port') or 5432}/{d['dbname']}"


def _dump(database_url: str, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    out = folder / "postgres_20260101_020000.dump"
    bindir = _pg_bindir(database_url)
    subprocess.run([f"{bindir}/pg_dump", "--format=custom", "--no-owner", "--file", str(out), database_url], check=True)
    return out


# --- 1. restore.sh redis: the "is it stopped?" guard fails open ----------------------------------------


@pytest.mark.timeout(60)
def test_restore_redis_refuses_while_anything_answers_at_the_address(tmp_path: Path) -> None:
    # Given a Redis data folder, and at the address of LLMQ_REDIS_URL something that accepts connections but
    # that redis-cli cannot talk to (a TLS server whose certificate it refuses, one asking another password,
    # one answering too slowly): here a bare listening socket behind a rediss:// URL
    data = tmp_path / "redis"
    (data / "appendonlydir").mkdir(parents=True)
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"rediss://127.0.0.1:{listener.getsockname()[1]}/0?ssl_cert_reqs=none"
    snapshot = tmp_path / "redis_20260101_020000.rdb"
    snapshot.write_bytes(b"REDIS0011")  # any backup file: the guard must stop before it is read
    env = {**os.environ, "LLMQ_REDIS_URL": url, "REDIS_CLI": REDIS_CLI}
    try:
        # When the runbook's restore runs against that folder
        result = run(str(SCRIPTS / "restore.sh"), "redis", str(snapshot), str(data), env=env)
    finally:
        listener.close()
    # Then it refuses (exit 3, "stop it first") and moves nothing: only a refused connection means stopped.
    # (It took every failure of `redis-cli ping` for "stopped", and moved a live server's files aside.)
    assert result.returncode == 3 and "stop it first" in result.stderr, result.stdout + result.stderr
    assert (data / "appendonlydir").exists()


# --- 2. the Redis URL of an ACL user: redis-cli authenticates with the user's NAME as the password ------


def _acl_redis(tmp_path: Path) -> Iterator[str]:
    data = tmp_path / "redis"
    data.mkdir()
    port = free_port()
    server = _redis_server(data, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "defaultpw")
    next(server)
    try:
        deadline = time.monotonic() + 20
        admin = redis.Redis(port=port, password="defaultpw")
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        admin.execute_command("ACL", "SETUSER", "llmq", "on", ">userpw", "~*", "&*", "+@all")
        url = f"redis://llmq:userpw@127.0.0.1:{port}/0"
        assert redis.from_url(url).execute_command("ACL", "WHOAMI") == b"llmq"  # llmq's client: fine
        yield url
    finally:
        next(server, None)


@pytest.mark.timeout(90)
def test_backup_authenticates_as_the_acl_user_of_the_redis_url(tmp_path: Path, database_url: str) -> None:
    # Given a Redis with an ACL user (redis://llmq:userpw@…, which llmq accepts and tests/test_ops.py lists
    # as handled: "rediss://llmq:plain@redis:6380/1")
    acl = _acl_redis(tmp_path)
    url = next(acl)
    try:
        env = {**os.environ, "LLMQ_DATABASE_URL": database_url, "LLMQ_REDIS_URL": url,
               "PG_BINDIR": _pg_bindir(database_url), "REDIS_CLI": REDIS_CLI}  # fmt: skip
        # When backup.sh runs
        result = run(str(SCRIPTS / "backup.sh"), str(tmp_path / "backups"), env=env)
        # Then it backs up. It failed: _redis_auth.sh turns the URL into redis://llmq@host, and redis-cli reads
        # a userinfo without ":" as the PASSWORD ("AUTH llmq"), ignoring REDISCLI_AUTH, so the snapshot is
        # refused (NOAUTH / WRONGPASS). A correct script passes the user with --user and the password in
        # REDISCLI_AUTH, and drops the userinfo from the URL.
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        next(acl, None)


@pytest.mark.timeout(90)
def test_maintenance_reaches_redis_as_the_acl_user_of_the_url(tmp_path: Path, database_url: str) -> None:
    acl = _acl_redis(tmp_path)
    url = next(acl)
    try:
        env = {**os.environ, "LLMQ_DATABASE_URL": database_url, "LLMQ_REDIS_URL": url, "DATA_DIR": str(tmp_path),
               "PG_BINDIR": _pg_bindir(database_url), "REDIS_CLI": REDIS_CLI}  # fmt: skip
        report = run(str(SCRIPTS / "maintenance.sh"), env=env)
        # A correct checklist reads the server's memory and persistence; this one reports Redis as broken
        # ("FAIL: redis: NOAUTH Authentication required.") while it is healthy, and skips the stream checks.
        assert "FAIL: redis:" not in report.stdout, report.stdout
    finally:
        next(acl, None)


# --- 3. maintenance.sh: a backup that failed today passes the "newest backup" check --------------------


@pytest.mark.timeout(60)
def test_maintenance_fails_when_the_newest_backup_is_30_hours_old(tmp_path: Path, database_url: str) -> None:
    # Given yesterday's backup (30 hours old: today's 02:00 backup.sh failed) and maintenance at 02:30
    backups = tmp_path / "backups"
    dump = _dump(database_url, backups)
    then = time.time() - 30 * 3600
    os.utime(dump, (then, then))
    env = {**os.environ, "LLMQ_DATABASE_URL": database_url, "LLMQ_REDIS_URL": "redis://127.0.0.1:1/0",
           "DATA_DIR": str(tmp_path), "PG_BINDIR": _pg_bindir(database_url)}  # fmt: skip
    report = run(str(SCRIPTS / "maintenance.sh"), env=env)
    # Then "newest backup … is older than a day" must be a FAIL (the runbook runs this check right after the
    # backup to catch exactly that). `find -mtime +1` only matches files at least 2 whole days old, so a
    # backup between 24 h and 48 h old passes as "readable" (maintenance.sh:112).
    assert "is older than a day" in report.stdout, report.stdout


# --- 4. restore.sh postgres: the admin password on psql's command line ---------------------------------


@pytest.mark.timeout(60)
def test_restore_postgres_keeps_the_admin_password_off_the_command_line(
    tmp_path: Path, database_url: str, postgres_admin_url: str
) -> None:
    # Given a lost database and the admin URL as the runbook writes it (postgresql://llmqueue:<pw>@…/postgres)
    dump = _dump(database_url, tmp_path / "backups")
    real = _pg_bindir(database_url)
    spy = tmp_path / "bin"
    spy.mkdir()
    argv_log = tmp_path / "argv.log"
    (spy / "psql").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{argv_log}"\nexec "{real}/psql" "$@"\n')
    (spy / "psql").chmod(0o755)
    (spy / "pg_restore").symlink_to(f"{real}/pg_restore")
    lost = "llmq_rv_" + uuid.uuid4().hex[:10]
    admin = _url_of(postgres_admin_url, password="Adm1nSecret")  # (trust auth here: the password is unused)
    env = {**os.environ, "LLMQ_DATABASE_URL": _url_of(database_url, dbname=lost),
           "LLMQ_ADMIN_DATABASE_URL": admin, "PG_BINDIR": str(spy)}  # fmt: skip
    try:
        run(str(SCRIPTS / "restore.sh"), "postgres", str(dump), env=env)
        # Then no tool's argv (what `ps` shows every user) holds a password: the scripts promise PGPASSWORD.
        # restore.sh:53 runs `psql "$LLMQ_ADMIN_DATABASE_URL"`, the superuser's password in the URL.
        assert "Adm1nSecret" not in argv_log.read_text()
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{lost}" WITH (FORCE)')


# --- 5. restore.sh postgres: a database created for a user that cannot restore into it -----------------


@pytest.mark.timeout(90)
async def test_restore_postgres_recreates_a_lost_database_for_a_non_superuser(
    tmp_path: Path, postgres_admin_url: str
) -> None:
    # Given llmq's own user, not a superuser, owning its database (as on a managed service, CloudNativePG, or
    # any server where the admin is another user), an archived row, and a backup
    role = "llmq_rv_" + uuid.uuid4().hex[:8]
    name = role + "_db"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{role}"')
    db = psycopg.conninfo.make_conninfo(postgres_admin_url, user=role, dbname=name)
    try:
        await migrate(db)
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(INSERT_ROW, (ROW_IDS[0],))
        dump = _dump(db, tmp_path / "backups")
        bindir = _pg_bindir(db)
        # When the database is lost and restore.sh creates it again through the admin URL
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        env = {**os.environ, "LLMQ_DATABASE_URL": _url_of(db), "LLMQ_ADMIN_DATABASE_URL": _url_of(postgres_admin_url),
               "PG_BINDIR": bindir}  # fmt: skip
        result = run(str(SCRIPTS / "restore.sh"), "postgres", str(dump), env=env)
        # Then the rows are back. They are not: the database is created owned by the ADMIN (restore.sh:53,
        # no OWNER clause), and since PostgreSQL 15 only the owner creates tables in its public schema, so
        # pg_restore as llmq's user fails with "permission denied for schema public" — and every run after
        # that too, the database now existing. CREATE DATABASE … OWNER <the user of LLMQ_DATABASE_URL> fixes it.
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


# --- 6. restore.sh postgres: a missing ROLE is reported as a missing database ---------------------------


@pytest.mark.timeout(60)
def test_restore_postgres_does_not_call_a_missing_role_a_missing_database(tmp_path: Path, database_url: str) -> None:
    # Given a backup and LLMQ_DATABASE_URL naming an existing database with a user name that does not exist
    # (a typo, or a role not yet created on a new server)
    dump = _dump(database_url, tmp_path / "backups")
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    env = {**os.environ, "LLMQ_DATABASE_URL": _url_of(database_url, user="no_such_role_rv"),
           "PG_BINDIR": _pg_bindir(database_url)}  # fmt: skip
    result = run(str(SCRIPTS / "restore.sh"), "postgres", str(dump), env=env)
    # Then the error names the role (psql said: role "no_such_role_rv" does not exist). restore.sh:34 takes
    # any "does not exist" for a lost DATABASE, and tells the operator to `createdb` one that exists (with
    # LLMQ_ADMIN_DATABASE_URL set it runs CREATE DATABASE on it). It should match 'database ".*" does not exist'.
    assert f'database "{name}" does not exist' not in result.stderr, result.stderr


# --- 7. db purge: tracebacks instead of errors ----------------------------------------------------------


def _purge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "llmq.cli", "db", "purge", *args, env=env, cwd=ROOT)


def _cli_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_") and k != "CONFIG_PATH"}
    return {**env, "LLMQ_DATABASE_URL": database_url}


@pytest.mark.timeout(60)
def test_db_purge_on_a_database_not_migrated_says_so_without_a_traceback(database_url: str) -> None:
    # Given a database without llmq's tables (db migrate not run yet, or LLMQ_DATABASE_URL naming another DB)
    result = _purge(_cli_env(database_url), "--older-than", "30d")
    # Then one error line naming the cause (run `llmq-stage db migrate`), exit 3/4 like the other commands.
    # It is a Python traceback ending in psycopg.errors.UndefinedTable (purge.py:49 catches ConnectError only).
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.timeout(60)
def test_db_purge_with_an_age_before_year_one_is_refused_cleanly(database_url: str) -> None:
    # "--older-than 3000000d" (a "keep forever" an operator may type) parses, then now - 3,000,000 days is
    # before year 1: OverflowError traceback (purge.py:41). A correct command exits 2 naming --older-than.
    result = _purge(_cli_env(database_url), "--older-than", "3000000d")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


# --- 8. Prometheus: two ingest replicas scraped through one static name ---------------------------------


def test_prometheus_scrapes_every_ingest_replica() -> None:
    # compose.prod.yaml now runs ingest as 2 replicas; the compose DNS name "ingest" resolves to both.
    # prometheus.yml still scrapes it as ONE static target "ingest:8080": each scrape (over a kept-alive
    # connection) reaches one replica only, so the other's requests, 5xx (HighErrorRate) and its being down
    # are never seen, and counters jump between replicas under one instance label. dispatch is scraped
    # through dns_sd_configs for exactly this reason (its comment says so); a replicated service needs it too.
    prod = yaml.safe_load((ROOT / "compose.prod.yaml").read_text())
    prom = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    replicated = [s for s, spec in prod["services"].items() if (spec.get("deploy") or {}).get("replicas", 1) > 1]
    assert "ingest" in replicated
    for service in replicated:
        job = jobs[f"llmq-{service}"]
        names = [n for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        assert service in names, f"llmq-{service}: {job}"


# --- 9. target files: a stage that fails during its start leaves its target behind ----------------------


@pytest.mark.timeout(90)
def test_an_archive_that_fails_to_start_withdraws_its_target(
    tmp_path: Path, stage_env: dict[str, str], postgres_admin_url: str
) -> None:
    # Given an archive stage whose PostgreSQL answers but refuses its migration (a user without CREATE on the
    # schema: a grant forgotten on a new server), announcing itself in metrics.targets_dir
    role = "llmq_rv_" + uuid.uuid4().hex[:8]
    name = role + "_db"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'CREATE DATABASE "{name}"')  # owned by the admin: since PG 15 the role cannot CREATE
    targets = tmp_path / "targets"
    targets.mkdir()
    env = {**stage_env, "LLMQ_SERVER__HOST": "127.0.0.1", "LLMQ_METRICS__TARGETS_DIR": str(targets),
           "LLMQ_METRICS__PORT": str(free_port() - 4),  # (archive's port is metrics.port + 4)
           "LLMQ_DATABASE_URL": _url_of(postgres_admin_url, user=role, dbname=name)}  # fmt: skip
    proc = llmq_stage(env, "run", "archive")
    try:
        # When it fails to start (it exits: "permission denied for schema public")
        deadline = time.monotonic() + 60
        while proc.popen.poll() is None:
            assert time.monotonic() < deadline, proc.text()[-3000:]
            time.sleep(0.1)
        code = proc.popen.returncode
        assert code != 0, proc.text()
        # Then its target file is gone, as for any process that stops ("removed when it stops"; only SIGKILL
        # should leave one). consume.py awaits `st.start()` OUTSIDE the try/finally that withdraws the target
        # (and stops the ops server, releases the consumer lease), so the file stays: Prometheus keeps a dead
        # target, and since the lease was not released either, the next start may take another consumer
        # name (<host>-2) and never overwrite it, so LlmqStageDown fires on until someone deletes the file.
        left = sorted(p.name for p in targets.iterdir())
        assert left == [], f"exit {code}, files left {left}:\n{proc.text()[-1500:]}"
    finally:
        stop_all([proc])
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')
