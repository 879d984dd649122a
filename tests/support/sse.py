"""Reading server-sent events in a test, as a client does."""

from __future__ import annotations

import httpx

Event = tuple[str | None, str, str]
"""An event's id (None when it has none), its name (``message`` when unnamed) and its data."""


async def read_events(
    http: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    got: list[Event] | None = None,
    stop_after: int = 0,
    until_broken: bool = False,
) -> list[Event]:
    """The events of ``url`` until the ``end`` event (or ``stop_after`` chunks), each appended to ``got`` as it
    comes (so a task reading can be watched). With ``until_broken``, a connection that breaks off (its
    server was killed) ends the reading instead of failing it."""
    events: list[Event] = [] if got is None else got
    current: dict[str, str] = {}
    try:
        async with http.stream("GET", url, headers=headers or {}) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line == "":
                    if "data" in current:
                        events.append((current.get("id"), current.get("event", "message"), current["data"]))
                        if current.get("event") == "end":
                            return events
                        if stop_after and sum(1 for e in events if e[1] == "chunk") >= stop_after:
                            return events
                    current = {}
                elif not line.startswith(":"):
                    field, _, value = line.partition(": ")
                    current[field] = value
    except httpx.HTTPError:
        if not until_broken:
            raise
    return events
