"""``llmq-stage``: exit codes and one-line errors, no secret in them, config warnings at start, status, help,
and ``up`` on embedded servers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis.asyncio as aioredis

from llmq.cli.stages import STAGES
from llmq.pipeline.config import RedisConfig
from llmq.pipeline.keys import Keys
from llmq.pipeline.redis import describe
from tests.conftest import eventually, free_port
from tests.support.procs import ROOT, Proc, llmq_stage, stop_all


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmq.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


REDIS_STAGES = [name for name in STAGES if name != "mock-backend"]


def errors_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The error lines a stage printed (text log format), after checking it printed no traceback."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if " ERROR " in line]


ECHO_BACKEND = '[{name: echo, url: "echo://local/v1"}]'


@pytest.mark.parametrize("stage", REDIS_STAGES)
def test_run_with_unreachable_redis_names_the_address_and_exits_4(
    stage: str, stage_env: dict[str, str], postgres_admin_url: str
) -> None:
    env = {
        **stage_env,
        "LLMQ_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        "LLMQ_DATABASE_URL": postgres_admin_url,  # archive checks PostgreSQL first
        "LLMQ_LOGGING__FORMAT": "text",
        "LLMQ_BACKENDS": ECHO_BACKEND,  # dispatch refuses to start without one
    }
    result = cli("run", stage, "--connect-timeout", "1", env=env)
    assert result.returncode == 4, result.stderr + result.stdout
    [error] = errors_of(result)
    assert "cannot connect to Redis at redis://127.0.0.1:" in error
    assert "hunter2" not in result.stdout + result.stderr  # no secrets in logs


def test_archive_with_unreachable_postgres_names_it_and_exits_4(stage_env: dict[str, str]) -> None:
    env = {
        **stage_env,
        "LLMQ_DATABASE_URL": f"postgresql://llmq:hunter2@127.0.0.1:{free_port()}/llmq",
        "LLMQ_LOGGING__FORMAT": "text",
    }
    result = cli("run", "archive", "--connect-timeout", "1", env=env)
    assert result.returncode == 4, result.stderr + result.stdout
    [error] = errors_of(result)
    assert "cannot connect to PostgreSQL at postgresql://llmq@127.0.0.1:" in error
    assert "hunter2" not in result.stdout + result.stderr


@pytest.mark.parametrize("stage", list(STAGES))
def test_run_with_a_bad_config_exits_3(stage: str, stage_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("scheduler: {strategy: fifo}\ndatabase: {redis: {pool_size: -1}}\n")
    result = cli("run", stage, "--config", str(bad), env=stage_env)
    assert result.returncode == 3
    assert "Traceback" not in result.stdout + result.stderr
    assert f"invalid configuration {bad}" in result.stderr
    assert 'scheduler.strategy: unknown value "fifo"' in result.stderr
    assert "database.redis.pool_size" in result.stderr


@pytest.mark.parametrize("stage", list(STAGES))
def test_run_on_a_port_in_use_names_it_and_exits_7(
    stage: str, stage_env: dict[str, str], postgres_admin_url: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {
            **stage_env,
            "LLMQ_DATABASE_URL": postgres_admin_url,
            "LLMQ_SERVER__HOST": "127.0.0.1",
            "LLMQ_LOGGING__FORMAT": "text",
            "LLMQ_BACKENDS": ECHO_BACKEND,
        }
        result = cli("run", stage, "--port", str(port), env=env)
    assert result.returncode == 7, result.stderr + result.stdout
    [error] = errors_of(result)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in error


def test_run_an_unknown_stage_exits_2(stage_env: dict[str, str]) -> None:
    result = cli("run", "nosuch", env=stage_env)
    assert result.returncode == 2
    assert "unknown stage 'nosuch'; stages: ingest" in result.stderr


def test_a_dispatcher_without_backends_refuses_to_start(stage_env: dict[str, str]) -> None:
    result = cli("run", "dispatch", "--port", "0", env=stage_env)
    assert result.returncode == 3
    assert "backends: none configured, and a dispatcher needs one" in result.stderr


def test_dlq_list_says_which_redis_it_read(stage_env: dict[str, str], keys: Keys) -> None:
    result = cli("dlq", "list", env=stage_env)
    assert result.returncode == 0, result.stderr
    assert f"key prefix {keys.prefix} (no config file" in result.stderr


async def test_pause_and_resume_from_the_cli(stage_env: dict[str, str], redis: aioredis.Redis, keys: Keys) -> None:
    # An operator pauses low, sees it in status, and resumes every level
    paused = cli("pause", "low", "--reason", "db upgrade", env=stage_env)
    assert paused.returncode == 0, paused.stderr
    assert "paused: low (since " in paused.stdout and "db upgrade" in paused.stdout
    assert await redis.hexists(keys.paused, "low")
    rows = {line.split()[0]: line.split() for line in cli("status", env=stage_env).stdout.splitlines()[1:]}
    assert rows["low"][-1] == "yes" and rows["high"][-1] == "-"
    everything = cli("pause", "--all", env=stage_env)
    assert "paused: every level" in everything.stdout
    resumed = cli("resume", "--all", env=stage_env)
    assert resumed.returncode == 0 and "admitting every level" in resumed.stdout
    assert await redis.hlen(keys.paused) == 0
    # Bad input is named, exit 2
    unknown = cli("pause", "lowest", env=stage_env)
    assert unknown.returncode == 2 and "no level 'lowest'; levels: realtime, high, normal, low" in unknown.stderr
    neither = cli("resume", env=stage_env)
    assert neither.returncode == 2 and "name the levels, or give --all" in neither.stderr


def test_help_explains_with_examples(stage_env: dict[str, str]) -> None:
    for args, expected in (
        ((), "llmq-stage up"),
        (("run",), "llmq-stage run ingest --config configs/config.yaml"),
        (("up",), "--scale dispatch=4"),
        (("status",), "--json"),
        (("config", "validate"), "exit 3"),
    ):
        result = cli(*args, "--help", env=stage_env)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout, (args, result.stdout)


async def test_status_shows_depth_per_level(stage_env: dict[str, str], redis: aioredis.Redis, keys: Keys) -> None:
    # Given 3 high and 1 low message, one of the high ones delivered to a scheduler, and 2 high in flight
    for level, n in (("high", 3), ("low", 1)):
        for _ in range(n):
            await redis.xadd(keys.level(level), {b"m": b"x"})
    await redis.xgroup_create(keys.level("high"), "schedule", id="0")
    await redis.xreadgroup("schedule", "s1", {keys.level("high"): ">"}, count=1)
    await redis.zadd(keys.inflight("high"), {"a": time.time() + 60, "b": time.time() + 60})
    # When an operator asks for the status
    table = cli("status", env=stage_env)
    as_json = cli("status", "--json", env=stage_env)
    # Then depth counts lag + pending, and the table has one row per level
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert list(rows) == ["realtime", "high", "normal", "low"]
    assert rows["high"][2:6] == ["3", "1", "2", "1"]  # depth, pending, in flight, consumers
    assert rows["low"][2:6] == ["1", "0", "0", "0"]
    assert rows["realtime"][6] == "-"
    # and it says which Redis it read, and that no config file named it
    url = stage_env["LLMQ_REDIS_URL"]
    assert f"reading {describe(RedisConfig(url=url))}, key prefix {keys.prefix}" in table.stderr
    assert "no config file" in table.stderr
    high = next(r for r in json.loads(as_json.stdout) if r["level"] == "high")
    assert high["depth"] == 3 and high["pending"] == 1 and high["oldest_age_s"] is not None


def _servers_under(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(path) in cmd:
            found.append(proc)
    return found


@pytest.mark.timeout(180)
async def test_up_runs_the_queue_on_embedded_servers_and_stops_cleanly(tmp_path: Path) -> None:
    # Given a machine with no Redis or Postgres configured
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_") and k != "CONFIG_PATH"}
    port = free_port()
    env["LLMQ_SERVER__PORT"] = str(port)
    env["LLMQ_SERVER__HOST"] = "127.0.0.1"
    env["LLMQ_METRICS__PORT"] = str(free_port(span=4))  # schedule; dispatch, retry, archive take the next ports
    data_dir = tmp_path / "data"
    env["LLMQ_HOME"] = str(data_dir)  # its data folder (the default: .llmq)
    # When `llmq-stage up` starts
    proc = llmq_stage(env, "up", "--mock-port", str(free_port()))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            async def healthy() -> bool:
                try:
                    return (await http.get("/api/v1/health")).status_code == 200
                except httpx.TransportError:
                    assert proc.popen.poll() is None, proc.text()
                    return False

            await eventually(healthy, within=90, interval=0.2, what="the API to answer")
            # Then the API answers and accepts a message, and embedded servers run under the data dir
            health = (await http.get("/api/v1/health")).json()
            created = await http.post(
                "/api/v1/messages",
                json={"level": "high", "request": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}},
            )
            assert created.status_code == 202, created.text
            # and the message goes through every stage to the mock backend
            # (the other stages may still be starting: the long-poll waits for them, the client longer still)
            done = await http.get(f"/api/v1/messages/{created.json()['id']}", params={"wait": "30"}, timeout=40)
        assert health["status"] == "ok" and health["checks"] == {"redis": "ok", "postgres": "ok"}
        assert done.json()["status"] == "completed", done.text + "\n" + proc.text()[-4000:]
        assert done.json()["result"]["choices"][0]["message"]["content"] == "mock reply from mock"
        assert "embedded Redis (valkey) listening on redis://127.0.0.1:" in proc.text()
        assert "embedded PostgreSQL listening on postgresql://" in proc.text()
        assert "no backend configured: mock backend on http://127.0.0.1:" in proc.text()
        assert f"llmq is up: dashboard http://127.0.0.1:{port}/" in proc.text()
        assert _servers_under(data_dir), "embedded servers should run while up runs"
        # and a command run beside it, with no config, reads the queue up runs (not localhost:6379), saying so
        argv = [sys.executable, "-m", "llmq.cli", "status", "--json"]
        beside = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60)
        assert beside.returncode == 0, beside.stderr
        assert "the servers of the llmq-stage up running here" in beside.stderr
        embedded_redis = re.search(r"embedded Redis \(valkey\) listening on (redis://\S+)", proc.text())
        assert embedded_redis and embedded_redis[1].rsplit("/", 1)[0] in beside.stderr
        assert {row["level"] for row in json.loads(beside.stdout)} >= {"high"}
        assert (data_dir / "servers.json").stat().st_mode & 0o777 == 0o600
        # When it receives SIGTERM
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.text()
    finally:
        proc.kill()
    # Then every stage and server is gone, and the data stays for the next start
    assert "llmq stopped" in proc.text()
    assert _servers_under(data_dir) == []
    assert not (data_dir / "servers.json").exists()  # nothing beside it to find any more
    assert (data_dir / "valkey").is_dir() and (data_dir / "postgres" / "PG_VERSION").exists()


def test_a_record_left_by_an_up_that_was_killed_is_ignored(tmp_path: Path) -> None:
    # Given a record of servers whose `llmq-stage up` is gone (killed: it could not remove it)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "servers.json").write_text(json.dumps({"pid": gone.pid, "env": {"LLMQ_REDIS_URL": "redis://x:1/0"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_") and k != "CONFIG_PATH"}
    env["LLMQ_HOME"] = str(tmp_path)
    # When a command runs beside it, then it does not read the recorded servers
    status = subprocess.run([sys.executable, "-m", "llmq.cli", "dlq", "list"], env=env, capture_output=True, text=True)
    assert "redis://x:1" not in status.stderr and "no config file" in status.stderr


@pytest.mark.parametrize("variable", ["LLMQ_REDIS_URL", "LLMQ_DATABASE__REDIS__URL", "LLMQ_DATABASE__REDIS__ADDR"])
def test_a_redis_named_in_the_environment_wins_over_the_record_of_a_live_up(tmp_path: Path, variable: str) -> None:
    # Given a live `llmq-stage up`'s record of its servers (a live pid)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": live.pid, "env": {"LLMQ_REDIS_URL": "redis://127.0.0.1:6379/0"}}
        (tmp_path / "servers.json").write_text(json.dumps(record))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_") and k != "CONFIG_PATH"}
        env["LLMQ_HOME"] = str(tmp_path)
        # When a command is told of another Redis, in any of the variables that name one (the record's
        # LLMQ_REDIS_URL, applied after LLMQ_DATABASE__..., used to win over the nested forms)
        env[variable] = "redis://127.0.0.1:1/0" if variable.endswith("URL") else "127.0.0.1:1"
        run = [sys.executable, "-m", "llmq.cli", "status"]
        status = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    finally:
        live.kill()
        live.wait()
    # Then it reads that one, not the recorded one
    assert "reading redis://127.0.0.1:1/0" in status.stderr and "llmq-stage up" not in status.stderr, status.stderr
    assert status.returncode == 4


# --- no secret in what a stage prints -------------------------------------------------------------------

PASSWORD = "Pw-Xq7/Zr9"
"""With an unescaped '/', which a URL parser reads in part as a port, a host or a path."""


@pytest.mark.parametrize(
    ("settings", "code", "named"),
    [
        ({"LLMQ_REDIS_URL": "redis://llmq:{pw}@127.0.0.1:{port}/0"}, 3, "database.redis.url: the host, port or"),
        ({"LLMQ_DATABASE__REDIS__ADDR": "redis://:{pw}@127.0.0.1:{port}"}, 3, "database.redis.addr: must be host:port"),
        (
            {"LLMQ_DATABASE__REDIS__ADDR": "127.0.0.1:{port}", "LLMQ_DATABASE__REDIS__PASSWORD": "{pw}"},
            4,
            "cannot connect to Redis at redis://127.0.0.1:{port}/0",
        ),
    ],
)
def test_a_stage_never_prints_the_redis_password(
    settings: dict[str, str], code: int, named: str, stage_env: dict[str, str]
) -> None:
    # Given a Redis that does not answer, and its password written in a URL, in the wrong field, or in its place
    port = free_port()
    env = {k: v for k, v in stage_env.items() if k != "LLMQ_REDIS_URL"} | {"LLMQ_LOGGING__FORMAT": "text"}
    env |= {k: v.format(pw=PASSWORD, port=port) for k, v in settings.items()}
    # When a stage starts
    result = cli("run", "schedule", "--connect-timeout", "1", env=env)
    # Then it stops with one line naming the field or the address, and no part of the password
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output
    assert named.format(port=port) in output
    for part in PASSWORD.split("/"):
        assert part not in output


# --- config warnings, production without keys -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_stage_logs_each_config_warning_once_at_start(stage_env: dict[str, str]) -> None:
    # Given fields that do nothing, and a shutdown grace (10s) shorter than a backend call may take
    env = {
        **stage_env,
        "LLMQ_QUEUE__ENABLE_METRICS": "true",
        "LLMQ_SCHEDULER__MAX_RETRIES": "3",
        "LLMQ_QUEUE__WORKER__SHUTDOWN_GRACE": "10s",
        "LLMQ_SCHEDULER__TIMEOUT": "2m",
    }
    # When a stage starts
    proc = llmq_stage(env, "run", "schedule", "--port", "0")
    try:
        proc.wait_for_log("stage started")
    finally:
        stop_all([proc])
    # Then it logged one warning naming both fields, and one naming the grace and the timeout
    warnings = [line["msg"] for line in proc.lines() if line["level"] == "warning"]
    [ignored] = [w for w in warnings if "fields that do nothing" in w]
    assert "queue.enable_metrics" in ignored and "scheduler.max_retries" in ignored
    [grace] = [w for w in warnings if "shutdown_grace" in w]
    assert "queue.worker.shutdown_grace: 10s is shorter than scheduler.timeout 2m" in grace
    assert len(warnings) == 2, warnings


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "ingest"],
        ["run", "dispatch"],
        ["run", "mock-backend"],
        ["up"],
        ["status"],
        ["db", "migrate"],
        ["dlq", "list"],
        ["config", "validate"],
    ],
)
def test_every_command_refuses_production_mode_without_api_keys(
    argv: list[str], stage_env: dict[str, str], tmp_path: Path
) -> None:
    # Given a production config with no API key, in the file or the environment
    path = tmp_path / "config.yaml"
    path.write_text("server: {mode: production}\n")
    env = {
        **stage_env,
        "CONFIG_PATH": str(path),
        "LLMQ_DATABASE_URL": f"postgresql://llmq@127.0.0.1:{free_port()}/llmq",
        "LLMQ_BACKENDS": '[{name: echo, url: "echo://local/v1"}]',  # so up starts no server of its own
    }
    # When a command loads it
    result = cli(*argv, env=env, timeout=30)
    # Then it exits 3 naming api_keys, before doing anything
    assert result.returncode == 3, result.stdout + result.stderr
    assert "  api_keys: server.mode is production but no API key is set" in result.stderr


# --- up binds loopback unless told ----------------------------------------------------------------------


def _listening(proc: Proc) -> set[tuple[str, int]]:
    """The addresses the processes under ``proc`` listen on."""
    children = psutil.Process(proc.pid).children(recursive=True)
    return {
        (conn.laddr.ip, conn.laddr.port)
        for child in children
        for conn in child.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("host_env", "args", "bound"),
    [
        ({}, [], "127.0.0.1"),
        ({"LLMQ_SERVER__HOST": "127.0.0.2"}, [], "127.0.0.2"),
        ({}, ["--host", "127.0.0.2"], "127.0.0.2"),
    ],
)
def test_up_binds_loopback_unless_told_otherwise(
    host_env: dict[str, str], args: list[str], bound: str, stage_env: dict[str, str], postgres_admin_url: str
) -> None:
    # Given up with Redis, PostgreSQL and a backend configured, running the API and the scheduler only
    api_port, ops_port = free_port(), free_port()
    env = {
        **stage_env,
        **host_env,
        "LLMQ_DATABASE_URL": postgres_admin_url,
        "LLMQ_SERVER__PORT": str(api_port),
        "LLMQ_METRICS__PORT": str(ops_port),
        "LLMQ_BACKENDS": '[{name: echo, url: "echo://local/v1"}]',
    }
    scale = [arg for stage in ("dispatch", "retry", "archive", "batch") for arg in ("--scale", f"{stage}=0")]
    # When it starts, with or without a host in the environment or on the command line
    proc = llmq_stage(env, "up", *scale, *args)
    try:
        proc.wait_for_log("ingest listening")
        proc.wait_for_log("stage started")
        listening = _listening(proc)
    finally:
        stop_all([proc])
    # Then the API and the scheduler's ops port listen on that address only
    assert listening == {(bound, api_port), (bound, ops_port)}, proc.text()
