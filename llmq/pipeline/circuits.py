"""Each dispatcher's view of the backends' circuits, shared through Redis so the dashboard can show it.

A circuit lives in the memory of the dispatcher that counts its failures (``llmq.stages.dispatch.routing``):
two dispatchers may disagree, one having seen a backend fail three times while the other has not called it.
Each dispatcher writes its view into one hash per backend (``Keys.backend_circuits``), a field per process,
when a circuit changes and every ``PUBLISH_S``; a view older than ``STALE_S`` is of a dispatcher that stopped:
readers skip it, and writers delete it (the hash holds the live dispatchers and those of the last minutes).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec
import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys

PUBLISH_S = 5.0
STALE_S = 3 * PUBLISH_S
FORGET_S = 600.0
"""A dispatcher's view this old is deleted by the next writer."""


class View(msgspec.Struct, frozen=True):
    """One dispatcher's circuit of one backend."""

    state: str
    """``closed``, ``open`` (no traffic until a probe succeeds) or ``cooling`` (a Retry-After)."""
    failures: int
    until: float | None
    """When a cooling circuit takes traffic again."""
    at: float
    """When the dispatcher wrote this view."""


_decoder = msgspec.json.Decoder(View)


async def publish(redis: aioredis.Redis, keys: Keys, process: str, views: dict[str, View]) -> None:
    """Write this process's view of each backend and delete views of dispatchers long gone."""
    now = time.time()
    pipe = redis.pipeline(transaction=False)
    for backend, view in views.items():
        pipe.hset(keys.backend_circuits(backend), process, msgspec.json.encode(view))
        pipe.hgetall(keys.backend_circuits(backend))
    replies = await pipe.execute()
    stale = redis.pipeline(transaction=False)
    for backend, fields in zip(views, replies[1::2], strict=True):
        old = [field for field, view in _views(fields) if now - view.at > FORGET_S]
        if old:
            stale.hdel(keys.backend_circuits(backend), *old)
    if len(stale):
        await stale.execute()


async def read(redis: aioredis.Redis, keys: Keys, backends: Iterable[str]) -> dict[str, list[View]]:
    """The live dispatchers' views of each backend (none: no dispatcher has published one lately)."""
    names = list(backends)
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.backend_circuits(name))
    replies = await pipe.execute()
    now = time.time()
    return {
        name: [_as_of(view, now) for _, view in _views(fields) if now - view.at <= STALE_S]
        for name, fields in zip(names, replies, strict=True)
    }


def _as_of(view: View, now: float) -> View:
    """A cooling circuit whose wait has passed takes calls again: closed, though not published as such yet."""
    if view.state == "cooling" and view.until is not None and view.until <= now:
        return msgspec.structs.replace(view, state="closed", until=None)
    return view


def summary(views: list[View]) -> dict[str, Any]:
    """The backend's circuit as the page shows it: the worst state any live dispatcher holds, and how many
    dispatchers hold it."""
    if not views:
        return {"state": "unknown", "dispatchers": 0, "of": 0, "failures": 0, "until": None}
    rank = {"open": 2, "cooling": 1, "closed": 0}
    worst = max(views, key=lambda v: rank.get(v.state, 3))
    holding = [v for v in views if v.state == worst.state]
    return {
        "state": worst.state,
        "dispatchers": len(holding),
        "of": len(views),
        "failures": max(v.failures for v in views),
        "until": max((v.until for v in holding if v.until is not None), default=None),
    }


def _views(fields: dict[bytes, bytes]) -> list[tuple[bytes, View]]:
    out = []
    for field, data in fields.items():
        try:
            out.append((field, _decoder.decode(data)))
        except msgspec.DecodeError:
            continue  # written by a release with another format: skipped, and overwritten by its writer
    return out
