"""Lua scripts, run by their SHA (EVALSHA) and loaded again when the server answers NOSCRIPT (a restarted
or failed-over Redis has no script cache).

redis-py's ``Script.__call__`` does the same, but first checks ``isinstance(client, Pipeline)``, and
``Pipeline`` derives from a typing Protocol, whose instance check is slow: under load it was a tenth of
the ingest stage's CPU. In a pipeline a script is queued through redis-py's Script, which has the
pipeline load it before running.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError


class Lua:
    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self._redis = redis
        self._script = redis.register_script(source)

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        sha = self._script.sha
        try:
            return await self._redis.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._redis.script_load(self._script.script)
            return await self._redis.evalsha(sha, len(keys), *keys, *args)

    async def queue(self, pipe: Pipeline, keys: Sequence[Any], args: Sequence[Any] = ()) -> None:
        """Queue a call on ``pipe``; its reply comes with the pipeline's."""
        await self._script(keys=keys, args=args, client=pipe)
