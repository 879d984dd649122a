"""A level's in-flight set: the admitted messages not yet ended, each scored by the expiry of its lease.

The one owner of ``keys.inflight(level)``. The scheduler's admission script holds a slot
(``scripts/inflight.lua``: ``inflight_hold``) and counts the live ones, dropping expired leases; an end
(``llmq.pipeline.transitions.ended``) or a hand-off to retry releases it (``release``), in the commit that acks
the entry; a dispatcher renews the leases of the calls it runs (``renew``), so a dispatcher that dies
mid-call frees its slots when their leases expire, and a live one never loses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmq.pipeline.keys import Keys
from llmq.pipeline.runtime.effects import Effect, release


def released(keys: Keys, level: str, message_id: str) -> Effect:
    """The commit effect that frees the message's slot of its level."""
    return release(keys.inflight(level), message_id)


def renew(pipe: Any, keys: Keys, held: Mapping[str, str], expiry: float) -> None:
    """Queue on ``pipe`` the renewal of each held message's lease (message id -> level) to ``expiry``: only
    of a message still in its set (one that ended is not put back), and never shortened."""
    for message_id, level in held.items():
        pipe.zadd(keys.inflight(level), {message_id: expiry}, xx=True, gt=True)


def count_live(pipe: Any, keys: Keys, level: str, now: float) -> None:
    """Queue on ``pipe`` the count of the level's slots held by a live lease at ``now``."""
    pipe.zcount(keys.inflight(level), now, "+inf")
