"""The HTTP API as real clients see it: the official openai SDK over real HTTP, and schemathesis."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys
from llmq.pipeline.runtime.ops_server import OpsServer, ops_app
from llmq.stages.ingest import create_app
from llmq.stages.mock_backend import MockSettings
from tests.conftest import free_port
from tests.support.harness import Harness
from tests.support.procs import llmq_stage


@pytest.fixture
async def api_url(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[str]:
    """The whole pipeline, with the ingest app served by uvicorn on a real port."""
    env = {"LLMQ_API_KEYS": "sk-test", "LLMQ_SERVER__SYNC_TIMEOUT": "5s"}
    config = {"a": {"max_concurrent": 8, "models": ["llama-3", "m"]}}
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=5)}, env=env, backend_config=config) as h:
        server = OpsServer(create_app(h.config, redis=redis, keys=keys), host="127.0.0.1", port=0, lifespan=True)
        server.start()
        try:
            yield f"http://127.0.0.1:{server.port}/v1"
        finally:
            await server.stop()


async def test_keep_alive_requests_are_not_held_up_by_delayed_acks() -> None:
    # Given a server on the stock asyncio loop (uvloop would set TCP_NODELAY by itself), whose responses
    # uvicorn writes as headers, then body
    async def health() -> dict[str, str]:
        return {"status": "ok", "padding": "x" * 2000}

    server = OpsServer(ops_app(health), host="127.0.0.1", port=0)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/health")).status_code == 200  # connected
            # When one client sends 20 requests in turn over its kept-alive connection
            started = time.perf_counter()
            for _ in range(20):
                assert (await client.get("/health")).status_code == 200
            elapsed = time.perf_counter() - started
    finally:
        await server.stop()
    # Then none waited for the client's delayed ACK (40 ms each on Linux, 0.8 s in all) before its body
    assert elapsed < 0.4, elapsed


async def test_the_openai_sdk_works_unchanged(api_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=api_url, api_key="sk-test", max_retries=0)
    completion = await client.chat.completions.create(
        model="llama-3",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        extra_headers={"X-LLMQ-Priority": "high"},
    )
    assert completion.choices[0].message.content == "mock reply from a"
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert completion.model == "llama-3"
    models = [m.id async for m in client.models.list()]
    assert sorted(models) == ["llama-3", "m"]
    # priority as a body field, through the SDK's extra_body
    again = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_body={"priority": "realtime"}
    )
    assert again.choices[0].finish_reason == "stop"
    await client.close()


async def test_the_sdk_gets_openai_shaped_errors(api_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=api_url, api_key="sk-test", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="stream must be true or false"):
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], extra_body={"stream": "yes"}
        )
    with pytest.raises(openai.BadRequestError, match="unknown priority 'urgent'"):
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"X-LLMQ-Priority": "urgent"}
        )
    wrong_key = openai.AsyncOpenAI(base_url=api_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong_key.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="no backend serves model 'gpt-9'"):
        await client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    await client.close()
    await wrong_key.close()


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_or_schema_violation(stage_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = {
        **stage_env,
        "LLMQ_SERVER__PORT": str(port),
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_SERVER__MAX_POLL_WAIT": "1s",
        "LLMQ_SERVER__SYNC_TIMEOUT": "1s",
        "LLMQ_LOGGING__FORMAT": "text",
    }
    ingest = llmq_stage(env, "run", "ingest")
    try:
        ingest.wait_for_log_text("ingest listening")
        result = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"http://127.0.0.1:{port}/openapi.json",
             "--max-examples", "25", "--seed", "7", "--phases", "examples,coverage,fuzzing",
             "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--request-timeout", "10"],
            cwd=tmp_path, capture_output=True, text=True, timeout=280,  # its cache stays out of the repo
        )  # fmt: skip
    finally:
        ingest.signal(signal.SIGTERM)
        ingest.wait()
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Traceback" not in ingest.text()
