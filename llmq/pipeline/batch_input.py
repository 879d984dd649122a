"""A batch's input file as OpenAI's Batch API defines it: JSON Lines, one request a line,
``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}``.

``LineChecker`` reads the file piece by piece as it is stored, never whole, and checks each line as it
completes: JSON, the four fields and their types, a ``custom_id`` no earlier line has, a ``url`` llmq
serves, a body that names its model and holds what its endpoint reads, no streaming, within the size of a
request. The first bad line stops the upload (``BadLine``: its number, the field and what is wrong), so a
file is stored whole and valid or not at all.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from llmq.pipeline.models import ENDPOINTS

URLS = {f"/v1/{endpoint}": endpoint for endpoint in ENDPOINTS}
"""The ``url`` of a line (and the ``endpoint`` of a batch) -> the backend path its requests go to."""
CUSTOM_ID_MAX = 512
READS = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}
"""The field of the body each endpoint's backend reads as its input."""


class InputLine(msgspec.Struct, forbid_unknown_fields=True):
    custom_id: Annotated[str, msgspec.Meta(min_length=1, max_length=CUSTOM_ID_MAX)]
    method: str
    url: str
    body: dict[str, Any]


_decoder = msgspec.json.Decoder(InputLine)


class BadLine(Exception):
    """A line of an input file that cannot run: ``line`` counts from 1; ``field`` is the line's field at
    fault (``body.model``), None for the line as a whole."""

    def __init__(self, line: int, message: str, field: str | None = None) -> None:
        super().__init__(f"line {line}: {message}")
        self.line, self.field = line, field


class LineChecker:
    """Checks an input file fed in pieces of any size; ``end()`` once the last piece is in."""

    def __init__(self, *, max_lines: int, max_line_bytes: int) -> None:
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.lines = 0
        """Requests read so far (blank lines are skipped, and counted in line numbers only)."""
        self.urls: set[str] = set()
        self._seen: dict[str, int] = {}
        """custom_id -> the line it came on."""
        self._number = 0
        self._tail = b""

    def feed(self, data: bytes) -> None:
        parts = (self._tail + data).split(b"\n")
        self._tail = parts.pop()
        if len(self._tail) > self.max_line_bytes:
            raise BadLine(self._number + 1, f"the line is over {self.max_line_bytes} bytes")
        for raw in parts:
            self._line(raw)

    def end(self) -> None:
        if self._tail:
            self._line(self._tail)
            self._tail = b""
        if not self.lines:
            raise BadLine(max(self._number, 1), "the file holds no request: one JSON object a line is expected")

    def _line(self, raw: bytes) -> None:
        self._number += 1
        number = self._number
        if not raw.strip():
            return
        if len(raw) > self.max_line_bytes:
            raise BadLine(number, f"the line is over {self.max_line_bytes} bytes")
        self.lines += 1
        if self.lines > self.max_lines:
            raise BadLine(number, f"the file holds more than {self.max_lines} requests (batches.max_lines)")
        try:
            item = _decoder.decode(raw)
        except msgspec.ValidationError as exc:
            message, _, where = str(exc).rpartition(" - at `$")
            if not message:  # about the line as a whole ("Expected `object`, got `array`")
                raise BadLine(number, str(exc)) from None
            raise BadLine(number, message, where.rstrip("`").lstrip(".") or None) from None
        except msgspec.DecodeError as exc:
            raise BadLine(number, f"malformed JSON: {exc}") from None
        if "\x00" in item.custom_id:  # PostgreSQL's text cannot hold it: it would come back changed
            raise BadLine(number, "custom_id must not hold a NUL character", "custom_id")
        first = self._seen.setdefault(item.custom_id, number)
        if first != number:
            raise BadLine(number, f"duplicate custom_id {item.custom_id!r} (first on line {first})", "custom_id")
        if item.method != "POST":
            raise BadLine(number, f"method must be POST, not {item.method!r}", "method")
        endpoint = URLS.get(item.url)
        if endpoint is None:
            raise BadLine(number, f"url must be one of {', '.join(URLS)}, not {item.url!r}", "url")
        self.urls.add(item.url)
        _check_body(number, endpoint, item.body)


def _check_body(number: int, endpoint: str, body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadLine(number, "body.model must name a model", "body.model")
    field = READS[endpoint]
    value = body.get(field)
    if value is None:
        raise BadLine(number, f"body.{field} is required for {endpoint}", f"body.{field}")
    if field == "messages" and (not isinstance(value, list) or not value):
        raise BadLine(number, "body.messages must be a non-empty array", "body.messages")
    if body.get("stream") is True:
        raise BadLine(number, "a batch's requests are not streamed: remove body.stream", "body.stream")
