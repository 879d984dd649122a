"""Lua scripts on a real server: reloaded after the server forgets them, sent together when called at once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.lua import Coalesced, Lua, Source, script_names, script_source
from llmq.pipeline.models import FIELD
from tests.conftest import free_port

INCRBY = Source("incrby", "return redis.call('INCRBY', KEYS[1], ARGV[1])", 1)
CHECKED = Source(
    "checked", "if ARGV[1] == 'bad' then return redis.error_reply('bad argument') end return ARGV[1]", None
)


async def test_every_script_file_loads_on_the_server(redis: aioredis.Redis) -> None:
    # Given every script of the package, with its includes and the generated constants (pieces too)
    names = script_names()
    assert {"commit", "submit", "cancel", "status", "inflight"} <= set(names)
    # When each is loaded, then the server compiles it (a syntax error or a bad include fails here)
    for name in names:
        assert len(await redis.script_load(script_source(name).text)) == 40, name


async def test_the_generated_constants_are_the_python_words(redis: aioredis.Redis) -> None:
    # Given a script reading the preamble's constants
    probe = Source(
        "probe",
        script_source("status").text + "return {QUEUED, CANCELLED, M, tostring(ENDED[DEAD]), SCHEDULE_GROUP}",
        0,
    )
    # When it runs, then they are Status's values and the message field, and DEAD is terminal
    assert await Lua(redis, probe)([]) == [b"queued", b"cancelled", FIELD, b"true", Group.SCHEDULE.value.encode()]


async def test_a_call_with_the_wrong_number_of_keys_is_refused_before_it_runs(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a script whose file name says it takes one key (renew-1.lua)
    script = Lua(redis, "renew")
    # When it is called with two, then it is refused naming the script, and nothing ran
    with pytest.raises(ValueError, match="renew takes 1 keys, was given 2"):
        await script([f"{keys.prefix}:a", f"{keys.prefix}:b"], ["g", "c"])
    with pytest.raises(ValueError, match="renew takes 1 keys"):
        await script.many([([], ["g", "c"])])


async def test_a_script_the_server_forgot_is_loaded_again(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a script called once, then a server that lost its script cache (as after a restart)
    script = Lua(redis, INCRBY)
    key = f"{keys.prefix}:counter"
    assert await script([key], [2]) == 2
    await redis.script_flush()
    # When it is called again, directly and as many calls at once, then it runs each time
    assert await script([key], [3]) == 5
    await redis.script_flush()
    assert await script.many([([key], [4]), ([key], [1])]) == [9, 10]


async def test_one_failing_call_of_many_fails_alone(redis: aioredis.Redis) -> None:
    replies = await Lua(redis, CHECKED).many([([], ["a"]), ([], ["bad"]), ([], ["c"])])
    assert replies[0] == b"a" and replies[2] == b"c"
    assert isinstance(replies[1], ResponseError) and "bad argument" in str(replies[1])


async def test_calls_made_at_once_share_one_round_trip(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    lua = Lua(redis, INCRBY)
    sent: list[int] = []
    pipelined = lua._pipelined

    async def counting(calls: list[tuple[list[str], list[int]]]) -> list[object]:
        sent.append(len(calls))
        return await pipelined(calls)

    monkeypatch.setattr(lua, "_pipelined", counting)
    script = Coalesced(lua)
    key = f"{keys.prefix}:counter"
    # When 50 coroutines call it in the same turn of the loop
    results = await asyncio.gather(*(script([key], [1]) for _ in range(50)))
    # Then one pipeline carried all 50, and each caller got its own reply
    assert sent == [50]
    assert sorted(results) == list(range(1, 51))
    # And a call made later goes in a pipeline of its own
    assert await script([key], [1]) == 51
    assert sent == [50, 1]


async def test_each_caller_gets_its_own_error(redis: aioredis.Redis) -> None:
    script = Coalesced(Lua(redis, CHECKED))
    results = await asyncio.gather(script([], ["a"]), script([], ["bad"]), return_exceptions=True)
    assert results[0] == b"a"
    assert isinstance(results[1], ResponseError)


async def test_every_caller_learns_that_redis_is_unreachable() -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    try:
        script = Coalesced(Lua(client, CHECKED))
        results = await asyncio.gather(*(script([], ["a"]) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    finally:
        await client.aclose()


async def test_a_cancelled_caller_does_not_disturb_the_others(redis: aioredis.Redis, keys: Keys) -> None:
    script = Coalesced(Lua(redis, INCRBY))
    key = f"{keys.prefix}:counter"
    cancelled = asyncio.create_task(script([key], [1]))
    kept = asyncio.create_task(script([key], [1]))
    await asyncio.sleep(0)  # both calls are waiting for the same pipeline
    cancelled.cancel()
    assert await kept in (1, 2)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
