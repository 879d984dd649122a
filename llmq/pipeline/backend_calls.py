"""What a backend call costs and what its answer means, as pure functions: the token estimate made before
the call (for tpm limits) and the classification of the answer after it (completed, retried or failed).

The echo backend counts its reported prompt tokens with the same ``prompt_chars``.
"""

from __future__ import annotations

import json
import math
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import msgspec

from llmq.pipeline.models import Status

_SURROGATE = re.compile("[\ud800-\udfff]")
"""A lone surrogate: ``json.loads`` joins an escaped pair into one character, so any left is alone."""
RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))


class CallResult(msgspec.Struct, kw_only=True):
    status: Status
    backend: str
    response: dict[str, Any] | None = None
    error: str | None = None
    retry_after: float | None = None
    """Seconds the backend asked to wait (Retry-After), clamped to ``queue.retry.max_backoff``."""
    tokens_used: int | None = None
    """Total tokens the response's ``usage`` reports."""
    acquired_at: float | None = None
    """When the backend's slot was taken: the minute its rpm and tpm counted the call in (None when this
    attempt counted nothing: the slot was held already)."""


def prompt_chars(request: dict[str, Any]) -> int:
    """Characters of the messages' contents (about 4 to a token)."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))


MAX_ESTIMATE = 10**9
"""No estimate is larger: a client's max_tokens of 1e15 must not overflow a minute's token counter."""
TOKENS_MAX = 2**63 - 1


def estimate_tokens(request: dict[str, Any]) -> int:
    """Prompt characters / 4 plus the requested completion budget (256 when unset or not a positive number),
    at most ``MAX_ESTIMATE``."""
    budget = request.get("max_completion_tokens") or request.get("max_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
        budget = 256
    return int(min(MAX_ESTIMATE, prompt_chars(request) // 4 + min(budget, MAX_ESTIMATE)))


def token_count(value: object) -> int | None:
    """A token count a backend reported, when it is one: an integer from 0 to what PostgreSQL's bigint holds."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= TOKENS_MAX:
        return value
    return None


def retry_after(value: str | None, *, max_s: float, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110), never negative,
    at most ``max_s``. None when absent or unreadable: ``inf``, ``nan`` and garbage are ignored rather than
    parking a message, or a backend's circuit, for ever."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), max_s)


def _body(response: httpx.Response) -> Any:
    """The JSON body: msgspec's parser, or the standard one for what msgspec refuses (escaped lone
    surrogates, NaN), which ``storable`` then cleans."""
    try:
        try:
            return msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            return json.loads(response.content)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def clean_text(text: str) -> str:
    """``text`` with U+FFFD for each lone surrogate, so it can be stored (encoded as UTF-8)."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def storable(body: Any) -> tuple[Any, str | None]:
    """``body`` made storable (msgpack and JSON as UTF-8): strings with lone surrogates get U+FFFD in
    their place. With a value no store takes (an integer past 64 bits), None and the reason."""
    problems: list[str] = []

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, str):
            return clean_text(value)
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return value
        if isinstance(value, int):
            if not -(2**63) <= value < 2**64:
                problems.append(f"an integer past 64 bits at {path or '<root>'}")
            return value
        if isinstance(value, dict):
            cleaned: dict[Any, Any] = {}
            for k, v in value.items():
                key = clean(k, path)  # the path names the key as it will be stored
                cleaned[key] = clean(v, f"{path}.{key}" if path else str(key))
            return cleaned
        if isinstance(value, list):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(body, "")
    return (None, problems[0]) if problems else (cleaned, None)


def classify(name: str, response: httpx.Response, *, max_retry_after_s: float) -> CallResult:
    """The outcome a backend's answer gives: a completion body (a JSON object) completes; a success whose
    body is not one, or a retryable status, is retried; any other status fails."""
    if response.is_success:
        try:
            body = _body(response)
        except ValueError:
            return CallResult(status=Status.RETRYING, backend=name, error="backend answered invalid JSON")
        if not isinstance(body, dict):
            error = f"backend answered JSON that is not an object: {response.text[:100]}"
            return CallResult(status=Status.RETRYING, backend=name, error=error)
        return CallResult(status=Status.COMPLETED, backend=name, response=body)
    detail = clean_text(response.text[:500])  # its charset may be any: utf-7 decodes to lone surrogates
    error = f"backend {name} answered {response.status_code}: {detail}"
    if response.status_code in RETRYABLE_STATUS:
        wait = retry_after(response.headers.get("retry-after"), max_s=max_retry_after_s)
        return CallResult(status=Status.RETRYING, backend=name, error=error, retry_after=wait)
    return CallResult(status=Status.FAILED, backend=name, error=error)
