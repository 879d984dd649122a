"""Writes that are safe to repeat: a reply lost after Redis executed a write (redis-py sends the command again
on a new connection) never makes a second entry, a second hand-off or a second admission.

Each test puts a ``FaultProxy`` between a client and the test's Redis and drops the reply to one chosen
request, then checks Redis itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.config import RedisConfig, load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import script_source
from llmq.pipeline.models import FIELD, Status
from llmq.pipeline.redis import make_redis
from llmq.pipeline.runtime.names import ConsumerLease
from llmq.pipeline.runtime.runner import Runner
from llmq.pipeline.runtime.streams import ensure_group, parse_entries
from llmq.stages.ingest import create_app
from llmq.stages.schedule.arbiter import Arbiter, Candidate, Decisions
from tests.conftest import eventually
from tests.support.clients import QUEUEING
from tests.support.faults import FaultProxy
from tests.support.harness import CHAT
from tests.support.runner import add_jobs, ids, make_runner, pending_count, settings
from tests.support.schedule import pending
from tests.support.worker import RecordingStage

EVALSHA = b"EVALSHA"


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    if redis_url.startswith("unix:"):
        pytest.skip("the fault proxy relays TCP")
    where = urlsplit(redis_url)
    async with FaultProxy(where.hostname or "127.0.0.1", where.port or 6379) as p:
        yield p


@pytest.fixture
async def faulty(proxy: FaultProxy, redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the test's Redis through the proxy, made as every stage makes its client."""
    db = urlsplit(redis_url).path or "/0"
    client = make(proxy.url(path=db))
    try:
        yield client
    finally:
        await client.aclose()


def make(url: str) -> aioredis.Redis:

    return make_redis(RedisConfig(url=url))


async def test_a_submission_whose_reply_is_lost_is_queued_once(
    faulty: aioredis.Redis, proxy: FaultProxy, redis: aioredis.Redis, keys: Keys
) -> None:
    # Given the API on a Redis connection that loses the reply to the next submission script
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix, **QUEUEING})
    transport = httpx.ASGITransport(app=create_app(config, redis=faulty, keys=keys))
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as http:
        assert (await http.post("/api/v1/messages", json={"request": CHAT})).status_code == 202  # script loaded
        proxy.arm("drop", EVALSHA)
        # When a client posts one message without an idempotency key
        response = await http.post("/api/v1/messages", json={"request": CHAT})
    # Then it was accepted once and is in its level once, though Redis ran the script twice
    assert proxy.counts.dropped_replies == 1
    assert response.status_code == 202, response.text
    entries = await redis.xrange(keys.level("normal"))
    assert len(entries) == 2
    queued = [msgspec.msgpack.decode(fields[FIELD])["id"] for _, fields in entries]
    assert queued[1] == response.json()["id"]


async def test_a_direct_admission_whose_reply_is_lost_is_admitted_once(
    faulty: aioredis.Redis, proxy: FaultProxy, redis: aioredis.Redis, keys: Keys
) -> None:
    # Given the API on an idle queue (a lone message is admitted at once), on a Redis connection that loses
    # the reply to the next submission script
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix})
    transport = httpx.ASGITransport(app=create_app(config, redis=faulty, keys=keys))
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as http:
        await redis.script_load(script_source("submit").text)
        proxy.arm("drop", EVALSHA)
        # When a client posts one realtime message
        response = await http.post("/api/v1/messages", json={"level": "realtime", "request": CHAT})
    # Then it was handed to dispatch once, its slot held once, though Redis ran the script twice
    assert proxy.counts.dropped_replies == 1 and response.status_code == 202, response.text
    entries = await redis.xrange(keys.dispatch)
    assert [msgspec.msgpack.decode(fields[FIELD])["id"] for _, fields in entries] == [response.json()["id"]]
    assert await redis.zcard(keys.inflight("realtime")) == 1 and await redis.xlen(keys.level("realtime")) == 0
    assert (await redis.hget(keys.msg(response.json()["id"]), "status")) == b"scheduled"


async def test_a_batch_submission_whose_reply_is_lost_is_queued_once(
    faulty: aioredis.Redis, proxy: FaultProxy, redis: aioredis.Redis, keys: Keys
) -> None:
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix, **QUEUEING})
    transport = httpx.ASGITransport(app=create_app(config, redis=faulty, keys=keys))
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as http:
        assert (await http.post("/api/v1/messages", json={"request": CHAT})).status_code == 202
        proxy.arm("drop", EVALSHA)
        response = await http.post("/api/v1/messages/batch", json=[{"request": CHAT}] * 250)
    assert proxy.counts.dropped_replies == 1
    assert [r["status_code"] for r in response.json()] == [202] * 250
    assert await redis.xlen(keys.level("normal")) == 251


async def test_a_hand_off_whose_reply_is_lost_is_committed_once(
    faulty: aioredis.Redis, proxy: FaultProxy, redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a consumer on a connection that loses the reply to its first commit
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": f"j{i}"} for i in range(20)])
    stage = RecordingStage(redis=faulty, stream=stream, group="work")
    runner = Runner(stage, redis=faulty, keys=keys, consumer="c1", settings=settings(batch_size=20, max_in_hand=20))
    await redis.script_load(script_source("commit").text)
    proxy.arm("drop", EVALSHA)
    # When it handles the batch
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: _handled(redis, stream, 20), what="20 handled")
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=15)
    # Then the commit ran twice in Redis, but each entry's effects (here a push) happened once
    assert proxy.counts.dropped_replies == 1
    assert sorted(await ids(redis, f"{stream}:handled")) == sorted(f"j{i}" for i in range(20))
    assert await pending_count(redis, stream) == 0


async def test_an_entry_settled_by_another_consumer_is_not_handed_off_again(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an entry a consumer held so long that another one took it over and committed it
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": "late"}])
    await ensure_group(redis, stream, "work")
    first = await redis.xreadgroup("work", "slow", {stream: ">"})
    entry = parse_entries(first[0][1])[0]
    other = Runner(
        RecordingStage(redis=redis, stream=stream, group="work"),
        redis=redis,
        keys=keys,
        consumer="fast",
        settings=settings(claim_timeout_s=0.2),
    )
    await asyncio.sleep(0.25)
    claimed = await other.reclaimer.claim(10)
    assert [e.id for e, _ in claimed] == [entry.id]
    assert await other.commit([(entry.id, [_push(keys, "fast")])]) == [True]
    # When the slow one commits it at last
    slow = Runner(
        RecordingStage(redis=redis, stream=stream, group="work"),
        redis=redis,
        keys=keys,
        consumer="slow",
        settings=settings(),
    )
    acked = await slow.commit([(entry.id, [_push(keys, "slow")])])
    # Then its commit acked nothing and changed nothing
    assert acked == [False]
    assert await redis.lrange(f"{keys.prefix}:pushed", 0, -1) == [b"fast"]


def _push(keys: Keys, value: str) -> Any:
    from llmq.pipeline.runtime.effects import rpush

    return rpush(f"{keys.prefix}:pushed", value)


async def test_an_admission_whose_reply_is_lost_admits_once(
    faulty: aioredis.Redis, proxy: FaultProxy, redis: aioredis.Redis, keys: Keys
) -> None:
    # Given three messages waiting in a scheduler, whose connection loses the reply to its next script
    env = {"LLMQ_KEY_PREFIX": keys.prefix, "LLMQ_BACKENDS": '[{name: a, url: "echo://a/v1", max_concurrent: 8}]'}
    arbiter = Arbiter(load_config(None, env=env), redis=faulty, keys=keys)
    decisions: Decisions = asyncio.Queue()
    candidates = await pending(redis, keys, "s1", 3, decisions)
    arbiter.offer("normal", candidates)
    await redis.script_load(script_source("admit").text)
    proxy.arm("drop", EVALSHA)
    # When it runs an admission round
    await arbiter._round()
    # Then each message is in the dispatch stream once, and each was decided admitted
    assert proxy.counts.dropped_replies == 1
    assert await redis.xlen(keys.dispatch) == 3
    decided = [decisions.get_nowait()[1] for _ in range(3)]
    assert decided.count(Status.SCHEDULED) + decided.count("gone") == 3
    assert await redis.xpending(keys.level("normal"), "schedule") == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_a_late_admission_does_not_readmit_a_message_that_ended(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a message admitted once, then completed
    env = {"LLMQ_KEY_PREFIX": keys.prefix, "LLMQ_BACKENDS": '[{name: a, url: "echo://a/v1", max_concurrent: 8}]'}
    arbiter = Arbiter(load_config(None, env=env), redis=redis, keys=keys)
    decisions: Decisions = asyncio.Queue()
    [cand] = await pending(redis, keys, "s1", 1, decisions)
    arbiter.offer("normal", [cand])
    await arbiter._round()
    await redis.hset(keys.msg(cand.message.id), "status", Status.COMPLETED.value)
    # When the same admission is made again (a repeated or late round)
    again = Candidate(cand.entry, cand.message, decisions)
    arbiter.offer("normal", [again])
    await arbiter._round()
    # Then it is not admitted again: one dispatch entry, and the message stays completed
    assert await redis.xlen(keys.dispatch) == 1
    assert await redis.hget(keys.msg(cand.message.id), "status") == b"completed"
    assert decisions.get_nowait()[1] is Status.SCHEDULED
    assert decisions.get_nowait()[1] is Status.COMPLETED  # acked by its intake, nothing recorded again


async def _handled(redis: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await redis.llen(f"{stream}:handled")) >= n


async def test_a_consumer_name_whose_lease_reply_is_lost_is_still_taken(
    faulty: aioredis.Redis, proxy: FaultProxy, redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a process taking a consumer name, whose SET NX of the free name's lease loses its reply
    lease = ConsumerLease(redis=faulty, keys=keys, group="work", ttl_s=15)
    proxy.arm("drop", b"NX")
    # When it takes a name
    name = await lease.acquire("worker-a")
    # Then it holds that name: the resent SET found its own token, not another process's
    assert proxy.counts.dropped_replies == 1
    assert name == "worker-a"
    assert await redis.get(keys.consumer_lease("work", "worker-a")) == lease.token.encode()


async def test_a_give_back_resent_after_a_lost_reply_undoes_one_delivery(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an entry delivered four times to c1
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": "g"}])
    reply = await redis.xreadgroup("work", "c1", {stream: ">"})
    entry = parse_entries(reply[0][1])[0]
    await redis.xclaim(stream, "work", "c1", 0, [entry.id], retrycount=4, justid=True)
    runner = make_runner(redis, keys, stream, "c1")
    # When it is given back twice (a resent script) with the count it was read with
    for _ in range(2):
        await runner.reclaimer.give_back([(entry, 4)])
    # Then one delivery is undone, not two
    rows: Any = await redis.xpending_range(stream, "work", "-", "+", 1)
    assert rows[0]["times_delivered"] == 3
