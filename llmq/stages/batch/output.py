"""A batch's output and error files, in OpenAI's line format, keyed by ``custom_id``.

A completed request's line: ``{"id": "batch_req_…", "custom_id": …, "response": {"status_code": 200,
"request_id": <message id>, "body": <the backend's answer>}, "error": null}``; any other's goes to the error
file with ``response: null`` and ``error: {"code": <how it ended>, "message": <why>}``; a line never queued
(the batch was cancelled or its window ended first) with the code ``batch_cancelled`` or ``batch_expired``.
"""

from __future__ import annotations

from typing import Any

import msgspec

_json = msgspec.json.Encoder()


def result_line(custom_id: str, message_id: str, response: str) -> bytes:
    """A completed request's line; ``response`` is the archived JSON text, passed through as stored."""
    head = _json.encode({"id": _request_id(message_id), "custom_id": custom_id})
    body = b'{"status_code":200,"request_id":' + _json.encode(message_id) + b',"body":' + response.encode() + b"}"
    return head[:-1] + b',"response":' + body + b',"error":null}\n'


def error_line(custom_id: str, message_id: str, code: str, message: str) -> bytes:
    doc: dict[str, Any] = {
        "id": _request_id(message_id),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return _json.encode(doc) + b"\n"


def _request_id(message_id: str) -> str:
    return "batch_req_" + message_id.replace("-", "")
