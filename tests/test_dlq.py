"""The dead-letter queue: finding, listing and replaying dead letters, old ones included."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis

from llmq.pipeline.config import load_config
from llmq.pipeline.dlq import DeadLetters, dead_letter
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, Message, encode, new_id
from llmq.pipeline.runtime.effects import Commit
from llmq.pipeline.submit import new_message
from llmq.stages.mock_backend import MockSettings
from tests.conftest import eventually
from tests.support.archive import status_in_db
from tests.support.clients import client_for
from tests.support.harness import CHAT, Harness
from tests.support.procs import ROOT


@pytest.mark.parametrize("ident", ["1-", "-1", "99999999999999999999-0", "\u0661-0", "1-2-3"])
async def test_a_dead_letter_id_that_is_no_stream_id_is_not_found(
    redis: aioredis.Redis, keys: Keys, ident: str
) -> None:
    async with client_for(redis, keys) as http:
        shown = await http.get(f"/api/v1/dlq/{ident}")
        replayed = await http.post(f"/api/v1/dlq/{ident}/replay")
    assert shown.status_code == replayed.status_code == 404


async def test_dead_letters_of_the_release_before_are_found_by_message_id(redis: aioredis.Redis, keys: Keys) -> None:
    # Given two dead letters written before the index existed, the second of the same message newer
    msg = new_message(message_id=new_id(), level="normal", request=CHAT)
    for reason in ("first", "second"):
        await redis.xadd(keys.dlq, {FIELD: encode(msg), b"reason": reason, b"message_id": msg.id})
    dead = DeadLetters(redis=redis, keys=keys, config=load_config(None, env={}))
    assert await dead.find(msg.id) is None
    # When the archive indexes them at start (once)
    assert await dead.reindex() == 2  # the older, then the newer over it
    assert await dead.reindex() == 0
    # Then the newest is found by message id
    found = await dead.find(msg.id)
    assert found is not None and found.reason == "second"


async def test_dead_letters_replay_once_and_complete(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    # Given a message that died on a failing backend (no retries), archived as dead
    env = {"LLMQ_QUEUE__RETRY__MAX_RETRIES": "0"}
    failing = {"a": MockSettings(fail_rate=1.0, fail_status=502, latency_ms=1)}
    async with Harness(redis, keys, backends=failing, env=env, database_url=database_url) as h:
        mid = await h.submit("high")
        assert (await h.wait_terminal([mid]))[mid]["status"] == "dead"
        await eventually(lambda: status_in_db(database_url, mid, "dead"), what="dead row")
        dlq = DeadLetters(redis=redis, keys=keys, config=load_config(None, env={}))
        [dead] = await dlq.list()
        assert dead.message_id == mid and "answered 502" in (dead.error or "")
        # When the backend recovers and the dead letter is replayed twice
        h.mocks["a"].settings = MockSettings(latency_ms=1)
        assert await dlq.replay(dead) is True
        assert await dlq.replay(dead) is False
        # Then the message completes once, with its replay on record
        status = (await h.wait_terminal([mid]))[mid]
        await eventually(lambda: status_in_db(database_url, mid, "completed"), what="completed row")
        calls = h.mocks["a"].by_message[mid]
    assert status["status"] == "completed"
    assert calls == 2  # the failed attempt and the replayed one
    assert await dlq.count() == 0


async def test_dlq_commands(redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str]) -> None:
    # Given two dead messages, dead-lettered as the retry stage does
    commit = Commit(redis, stream=keys.retry, group="retry", channel=keys.finished, dlq=keys.dlq)
    for level in ("high", "low"):
        msg = Message(id=new_id(), level=level, request=CHAT, enqueued_at=time.time(), attempts=4, errors=["e1", "e4"])
        fields = {b"error": b"e4", b"errors": json.dumps(msg.errors)}
        letter = dead_letter(
            keys, payload=encode(msg), message_id=msg.id, reason="failed 4 attempts", source=keys.retry, fields=fields
        )
        await commit([("", [letter])])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmq.cli", "dlq", *args], env=stage_env, cwd=ROOT, capture_output=True, text=True
        )

    listed = cli("list", "--json")
    docs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [d["level"] for d in docs] == ["high", "low"] and docs[0]["errors"] == ["e1", "e4"]
    shown = cli("show", docs[0]["message_id"])
    assert shown.returncode == 0 and json.loads(shown.stdout)["request"] == CHAT
    # replay one into another level, then the rest
    assert cli("replay", docs[0]["entry_id"], "--level", "realtime").stdout.strip() == "replayed 1 of 1 dead letters"
    again = cli("replay", docs[0]["entry_id"])
    assert again.returncode == 1 and "already replayed" in again.stderr
    assert cli("replay", "--all").stdout.strip() == "replayed 1 of 1 dead letters"
    assert await redis.xlen(keys.level("realtime")) == 1 and await redis.xlen(keys.level("low")) == 1
    assert cli("replay").returncode == 2
    assert cli("list", "--since", "5 min").returncode == 2  # a bad duration is named
    assert cli("purge", "--older-than", "0s").stdout.startswith("purged 0")


async def test_dead_letters_are_bounded_and_found_by_message_id(redis: aioredis.Redis, keys: Keys) -> None:
    # Given 30 dead letters, each of its own message
    dead = DeadLetters(redis=redis, keys=keys, config=load_config(None, env={}))
    commit = Commit(redis, stream=keys.retry, group="retry", channel=keys.finished, dlq=keys.dlq)
    ids = [new_id() for _ in range(30)]
    for mid in ids:
        msg = Message(id=mid, level="normal", request=CHAT, enqueued_at=time.time())
        letter = dead_letter(keys, payload=encode(msg), message_id=mid, reason="failed", source=keys.retry)
        await commit([("", [letter])])
    # Then each is found by its message id without a scan
    found = await dead.find(ids[3])
    assert found is not None and found.message_id == ids[3]
    # When the stream is bounded to 10, then the 20 oldest go, with their index entries
    assert await dead.trim(max_len=10, max_age_s=3600) == 20
    assert await redis.xlen(keys.dlq) == 10 and await redis.hlen(keys.dlq_index) == 10
    assert await dead.find(ids[3]) is None
    kept = await dead.find(ids[25])
    assert kept is not None and kept.message_id == ids[25]
    # and by age: all of them are older than 50 ms a moment later
    await asyncio.sleep(0.1)
    assert await dead.trim(max_len=1000, max_age_s=0.05) == 10
    assert await redis.xlen(keys.dlq) == 0 and await redis.hlen(keys.dlq_index) == 0
