"""Reading a batch's input file from where its feeding stopped: its lines from a chunk and an offset in it,
each with the position after it, so the batch stage records exactly how far it got."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmq.pipeline.filestore import FileStore


@dataclass(frozen=True, slots=True)
class Position:
    chunk: int
    offset: int


@dataclass(frozen=True, slots=True)
class Line:
    data: bytes
    after: Position
    """Where the next line starts."""


async def lines_from(store: FileStore, file_id: str, start: Position) -> AsyncIterator[Line]:
    """The file's non-blank lines from ``start`` to its end (one chunk in memory at a time, plus a line that
    spans two)."""
    seq, offset = start.chunk, start.offset
    held = b""
    while (data := await store.chunk(file_id, seq)) is not None:
        at = offset
        while (end := data.find(b"\n", at)) >= 0:
            line, at = held + data[at:end], end + 1
            held = b""
            after = Position(seq, at) if at < len(data) else Position(seq + 1, 0)
            if line.strip():
                yield Line(line, after)
        held += data[at:]
        seq, offset = seq + 1, 0
    if held.strip():
        yield Line(held, Position(seq, 0))
