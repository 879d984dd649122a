"""A stream survives its ingest: every stage as a process, two ingest replicas; the one a client reads a
streamed answer from is SIGKILLed mid-stream, and the client resumes on the other with Last-Event-ID."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest

from tests.conftest import free_port
from tests.support.harness import CHAT
from tests.support.procs import llmq_stage, stop_all
from tests.support.sse import Event, read_events

TOKENS = 40


@pytest.mark.timeout(120)
async def test_a_client_resumes_on_another_ingest_after_its_own_was_killed(stage_env: dict[str, str]) -> None:
    mock_port, api_a, api_b = free_port(), free_port(), free_port()
    env = stage_env | {
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock_port}/v1", max_concurrent: 4}}]',
    }
    procs = [llmq_stage(env, "run", "mock-backend", "--port", str(mock_port), "--latency-ms", "5")]
    procs += [llmq_stage(env | {"LLMQ_SERVER__PORT": str(p)}, "run", "ingest") for p in (api_a, api_b)]
    procs += [llmq_stage(env, "run", s, "--port", "0") for s in ("schedule", "dispatch", "retry")]
    mock, ingest_a, ingest_b = procs[:3]
    try:
        for proc in procs[3:]:
            proc.wait_for_log("stage started", timeout=30)
        ingest_a.wait_for_log_text("ingest listening", timeout=30)
        ingest_b.wait_for_log_text("ingest listening", timeout=30)
        mock.wait_for_log_text("mock backend listening", timeout=30)
        async with httpx.AsyncClient(timeout=30) as http:
            # Given a slow streamed answer (40 chunks at 20/s)
            slow = {"latency_ms": 5, "stream_tokens": TOKENS, "tokens_per_s": 20}
            (await http.post(f"http://127.0.0.1:{mock_port}/admin/config", json=slow)).raise_for_status()
            created = await http.post(
                f"http://127.0.0.1:{api_a}/api/v1/messages", json={"level": "high", "request": CHAT | {"stream": True}}
            )
            mid = created.json()["id"]
            # When a client reads it from ingest A, and A is SIGKILLed after ten chunks
            first: list[Event] = []
            reading = read_events(
                http, f"http://127.0.0.1:{api_a}/api/v1/messages/{mid}/events", got=first, until_broken=True
            )
            task = asyncio.create_task(reading)
            while sum(1 for g in first if g[1] == "chunk") < 10:
                assert not task.done(), first
                await asyncio.sleep(0.01)
            ingest_a.kill()
            await asyncio.wait_for(task, 10)
            last = [g for g in first if g[1] == "chunk"][-1][0]
            # and resumes on ingest B with the last id it got
            rest: list[Event] = []
            url_b = f"http://127.0.0.1:{api_b}/api/v1/messages/{mid}/events"
            await read_events(http, url_b, headers={"Last-Event-ID": last}, got=rest)
    finally:
        stop_all(procs)
    # Then every chunk arrived exactly once, in order, and the answer completed
    chunks = [g for g in first + rest if g[1] == "chunk"]
    assert len({g[0] for g in chunks}) == len(chunks)
    text = "".join(
        c.get("delta", {}).get("content") or "" for g in chunks for c in msgspec.json.decode(g[2])["choices"]
    )
    assert text == "".join(f"t{i} " for i in range(TOKENS))
    assert rest[-1][1] == "end" and msgspec.json.decode(rest[-1][2])["status"] == "completed"
