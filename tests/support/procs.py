"""Stage processes for tests: started with the test's environment, logs captured to a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_LOGS = tempfile.TemporaryDirectory(prefix="llmq-test-logs-", ignore_cleanup_errors=True)
"""Every test process's log, removed when the test session ends; a failing assertion prints the log."""


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.log = Path(tempfile.mkstemp(prefix="llmq-test-", suffix=".log", dir=_LOGS.name)[1])
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def find(self, msg_prefix: str) -> dict[str, Any] | None:
        return next((line for line in self.lines() if str(line.get("msg", "")).startswith(msg_prefix)), None)

    def wait_for_log(self, msg_prefix: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(msg_prefix)
            if found:
                return found
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited with {self.popen.returncode}:\n{self.text()}")
            time.sleep(0.02)
        raise AssertionError(f"no log line {msg_prefix!r} within {timeout}s:\n{self.text()}")

    def wait_for_log_text(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log (exit {self.popen.poll()}):\n{self.text()}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)


def stop_all(procs: list[Proc], timeout: float = 30) -> None:
    """SIGTERM every process still running, wait for each to exit, SIGKILL any that does not."""
    for proc in procs:
        if proc.popen.poll() is None:
            proc.signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        finally:
            proc.kill()


def worker(env: dict[str, str], stream: str, *, group: str = "work", consumer: str | None = None) -> Proc:
    argv = [sys.executable, "-m", "tests.support.worker", "--stream", stream, "--group", group]
    if consumer:
        argv += ["--consumer", consumer]
    return Proc(argv, env)


def llmq_stage(env: dict[str, str], *args: str) -> Proc:
    return Proc([sys.executable, "-m", "llmq.cli", *args], env)
