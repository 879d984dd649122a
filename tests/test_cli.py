"""``llmq-stage``: exit codes and one-line errors, status, help, and ``up`` on embedded servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import redis.asyncio as aioredis

from cli.stages import STAGES
from pipeline.keys import Keys
from tests.conftest import eventually, free_port
from tests.procs import ROOT, llmq_stage


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


REDIS_STAGES = [name for name in STAGES if name != "mock-backend"]


def errors_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The error lines a stage printed (text log format), after checking it printed no traceback."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if " ERROR " in line]


@pytest.mark.parametrize("stage", REDIS_STAGES)
def test_run_with_unreachable_redis_names_the_address_and_exits_4(
    stage: str, stage_env: dict[str, str], postgres_admin_url: str
) -> None:
    env = {
        **stage_env,
        "LLMQ_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        "LLMQ_DATABASE_URL": postgres_admin_url,  # archive checks PostgreSQL first
        "LLMQ_LOGGING__FORMAT": "text",
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
        }
        result = cli("run", stage, "--port", str(port), env=env)
    assert result.returncode == 7, result.stderr + result.stdout
    [error] = errors_of(result)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in error


def test_run_an_unknown_stage_exits_2(stage_env: dict[str, str]) -> None:
    result = cli("run", "nosuch", env=stage_env)
    assert result.returncode == 2
    assert "unknown stage 'nosuch'; stages: ingest" in result.stderr


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
    # Given 3 high and 1 low message, one of the high ones delivered to a scheduler
    for level, n in (("high", 3), ("low", 1)):
        for _ in range(n):
            await redis.xadd(keys.level(level), {b"m": b"x"})
    await redis.xgroup_create(keys.level("high"), "schedule", id="0")
    await redis.xreadgroup("schedule", "s1", {keys.level("high"): ">"}, count=1)
    # When an operator asks for the status
    table = cli("status", env=stage_env)
    as_json = cli("status", "--json", env=stage_env)
    # Then depth counts lag + pending, and the table has one row per level
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert list(rows) == ["realtime", "high", "normal", "low"]
    assert rows["high"][2:5] == ["3", "1", "1"]  # depth, pending, consumers
    assert rows["low"][2:5] == ["1", "0", "0"]
    assert rows["realtime"][5] == "-"
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
    env["LLMQ_METRICS__PORT"] = str(free_port())  # schedule; dispatch, retry, archive take the next ports
    data_dir = tmp_path / "data"
    # When `llmq-stage up` starts
    proc = llmq_stage(env, "up", "--data-dir", str(data_dir), "--mock-port", str(free_port()))
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
        assert done.json()["status"] == "completed", done.text
        assert done.json()["result"]["choices"][0]["message"]["content"] == "mock reply from mock"
        assert "embedded Redis (valkey) listening on redis://127.0.0.1:" in proc.text()
        assert "embedded PostgreSQL listening on postgresql://" in proc.text()
        assert "no backend configured: mock backend on http://127.0.0.1:" in proc.text()
        assert _servers_under(data_dir), "embedded servers should run while up runs"
        # When it receives SIGTERM
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.text()
    finally:
        proc.kill()
    # Then every stage and server is gone, and the data stays for the next start
    assert "llmq stopped" in proc.text()
    assert _servers_under(data_dir) == []
    assert (data_dir / "valkey").is_dir() and (data_dir / "postgres" / "PG_VERSION").exists()
