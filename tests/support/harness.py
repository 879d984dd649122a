"""The pipeline in one test process: real Redis, mock backends over real HTTP, the real stages' runners.

Messages enter through the ingest app (in-process ASGI), so the whole path is the production one except
that stages share the test's event loop instead of running as separate processes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import msgspec
import redis.asyncio as aioredis

from llmq.cli.consume import runner_settings
from llmq.cli.stages import make_archive, make_batch, make_retry
from llmq.pipeline.config import Config, load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.runtime.ops_server import OpsServer
from llmq.pipeline.runtime.runner import Runner
from llmq.pipeline.runtime.stage import Stage
from llmq.stages.dispatch import Dispatch
from llmq.stages.ingest import create_app
from llmq.stages.mock_backend import MockBackend, MockSettings
from llmq.stages.schedule import make_stages
from tests.support.clients import QUEUEING

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


class Harness:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        backends: dict[str, MockSettings],
        env: dict[str, str] | None = None,
        backend_config: dict[str, dict[str, Any]] | None = None,
        stages: tuple[str, ...] = ("schedule", "dispatch", "retry"),
        database_url: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.mocks = {name: MockBackend(settings, name=name) for name, settings in backends.items()}
        self.servers = {name: OpsServer(m.app(), host="127.0.0.1", port=0) for name, m in self.mocks.items()}
        entries = []
        for name, server in self.servers.items():
            extra = (backend_config or {}).get(name, {"max_concurrent": 8})
            # a string value may name the mock's own port: "http://127.0.0.1:{port}/metrics"
            extra = {k: v.format(port=server.port) if isinstance(v, str) else v for k, v in extra.items()}
            fields = ", ".join(f"{k}: {msgspec.json.encode(v).decode()}" for k, v in extra.items())
            entries.append(f'{{name: {name}, url: "http://127.0.0.1:{server.port}/v1", {fields}}}')
        base = {
            "LLMQ_KEY_PREFIX": keys.prefix,
            "LLMQ_BACKENDS": "[" + ", ".join(entries) + "]",
            "LLMQ_QUEUE__WORKER__PROCESS_INTERVAL": "50ms",
            "LLMQ_QUEUE__WORKER__CLAIM_TIMEOUT": "2s",
            "LLMQ_QUEUE__RETRY__INITIAL_BACKOFF": "50ms",
            "LLMQ_QUEUE__RETRY__MAX_BACKOFF": "200ms",
            "LLMQ_SCHEDULER__TIMEOUT": "5s",
            "LLMQ_LOADBALANCER__HEALTH_CHECK_INTERVAL": "200ms",
        }
        if "schedule" not in stages:
            base |= QUEUEING
        if database_url:
            base["LLMQ_DATABASE_URL"] = database_url
            stages = (*stages, "archive")
        self.config: Config = load_config(None, env={**base, **(env or {})})
        self.stage_names = stages
        self.runners: list[Runner] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stages: list[Stage] = []
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(self.config, redis=redis, keys=keys)), base_url="http://ingest"
        )

    async def __aenter__(self) -> Harness:
        for server in self.servers.values():
            server.start()
        settings = runner_settings(self.config)
        built: list[Stage] = []
        if "schedule" in self.stage_names:
            built += make_stages(config=self.config, redis=self.redis, keys=self.keys)
        if "dispatch" in self.stage_names:
            built.append(Dispatch(config=self.config, redis=self.redis, keys=self.keys))
        if "retry" in self.stage_names:
            built += make_retry(config=self.config, redis=self.redis, keys=self.keys)
        if "archive" in self.stage_names:
            built.append(make_archive(config=self.config, redis=self.redis, keys=self.keys))
        if "batch" in self.stage_names:
            built.append(make_batch(config=self.config, redis=self.redis, keys=self.keys))
        self.stages = built
        for stage in built:
            await stage.start()
            runner = Runner(stage, redis=self.redis, keys=self.keys, consumer="t1", settings=settings)
            self.runners.append(runner)
            self.tasks.append(asyncio.create_task(runner.run()))
        return self

    async def __aexit__(self, *_: object) -> None:
        for runner in self.runners:
            runner.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout=30)
        for stage in reversed(self.stages):
            await stage.close()
        for server in self.servers.values():
            await server.stop()
        await self.http.aclose()

    async def submit(self, level: str = "normal", **fields: Any) -> str:
        response = await self.http.post("/api/v1/messages", json={"level": level, "request": CHAT, **fields})
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    async def status(self, message_id: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(self.keys.msg(message_id))  # type: ignore[misc]
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def wait_terminal(self, ids: list[str], within: float = 30.0) -> dict[str, dict[str, str]]:
        deadline = time.monotonic() + within
        terminal = {"completed", "failed", "expired", "cancelled", "dead"}
        while True:
            statuses = {i: await self.status(i) for i in ids}
            if all(s.get("status") in terminal for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                stuck = {i: s.get("status") for i, s in statuses.items() if s.get("status") not in terminal}
                raise AssertionError(f"{len(stuck)} messages not terminal after {within}s: {list(stuck.items())[:5]}")
            await asyncio.sleep(0.02)
