"""Stream primitives shared by the runtime and the stages: entries, their parsing, group creation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llmq.pipeline.models import FIELD


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: its id and the payload of its single field."""

    id: str
    data: bytes


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_entries(raw: Sequence[Any]) -> list[Entry]:
    """Entries from an XREADGROUP/XAUTOCLAIM reply; a trimmed entry has no fields and an empty payload."""
    return [Entry(as_str(entry_id), (fields or {}).get(FIELD, b"")) for entry_id, fields in raw]


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> bool:
    """Create the consumer group (and the stream) if missing; an existing group is fine. True when created."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if not str(exc).startswith("BUSYGROUP"):
            raise
        return False
    return True
