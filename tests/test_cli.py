"""``llmq-stage``: exit codes and one-line errors, status, help, and ``up`` on embedded servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import redis.asyncio as aioredis

from pipeline.keys import Keys
from tests.conftest import eventually, free_port
from tests.procs import ROOT, llmq_stage


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def test_run_with_unreachable_redis_names_the_address_and_exits_4(stage_env: dict[str, str]) -> None:
    env = {**stage_env, "LLMQ_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0", "LLMQ_LOGGING__FORMAT": "text"}
    result = cli("run", "ingest", "--connect-timeout", "1", env=env)
    assert result.returncode == 4, result.stderr + result.stdout
    output = result.stdout + result.stderr
    assert "cannot connect to Redis at redis://127.0.0.1:" in output
    assert "hunter2" not in output  # no secrets in logs
    assert "Traceback" not in output


def test_run_with_a_bad_config_exits_3(stage_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("scheduler: {strategy: fifo}\n")
    result = cli("run", "ingest", "--config", str(bad), env=stage_env)
    assert result.returncode == 3
    assert f"invalid configuration {bad}" in result.stderr
    assert 'scheduler.strategy: unknown value "fifo"' in result.stderr


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
            done = await http.get(f"/api/v1/messages/{created.json()['id']}", params={"wait": "30"})
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
