"""What a backend call costs and what its answer means, as pure functions: the token estimate made before
the call (for tpm limits) and the classification of the answer after it (completed, retried or failed).

The echo backend counts its reported prompt tokens with the same ``prompt_chars``.
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from pipeline.models import Status

RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))


class CallResult(msgspec.Struct, kw_only=True):
    status: Status
    backend: str
    response: dict[str, Any] | None = None
    error: str | None = None
    retry_after: float | None = None


def prompt_chars(request: dict[str, Any]) -> int:
    """Characters of the messages' contents (about 4 to a token)."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))


def estimate_tokens(request: dict[str, Any]) -> int:
    """Prompt characters / 4 plus the requested completion budget (256 when unset)."""
    budget = request.get("max_completion_tokens") or request.get("max_tokens") or 256
    return prompt_chars(request) // 4 + (int(budget) if isinstance(budget, int | float) else 256)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def classify(name: str, response: httpx.Response) -> CallResult:
    """The outcome a backend's answer gives: a completion body (a JSON object) completes; a success whose
    body is not one, or a retryable status, is retried; any other status fails."""
    if response.is_success:
        try:
            body = response.json()
        except ValueError:
            return CallResult(status=Status.RETRYING, backend=name, error="backend answered invalid JSON")
        if not isinstance(body, dict):
            error = f"backend answered JSON that is not an object: {response.text[:100]}"
            return CallResult(status=Status.RETRYING, backend=name, error=error)
        return CallResult(status=Status.COMPLETED, backend=name, response=body)
    detail = response.text[:500]
    error = f"backend {name} answered {response.status_code}: {detail}"
    if response.status_code in RETRYABLE_STATUS:
        return CallResult(status=Status.RETRYING, backend=name, error=error, retry_after=_retry_after(response))
    return CallResult(status=Status.FAILED, backend=name, error=error)
