"""What a request costs in tokens before it runs: its prompt's characters (about 4 to a token) and its
completion budget. The dispatcher's tpm limits, the tenants' tpm quotas and their fair shares all count this
estimate; the echo backend reports prompt tokens by the same count."""

from __future__ import annotations

from typing import Any

MAX_ESTIMATE = 10**9
"""No estimate is larger: a client's max_tokens of 1e15 must not overflow a minute's token counter."""


def prompt_chars(request: dict[str, Any]) -> int:
    """Characters of the messages' contents, or of a legacy ``prompt`` or an embedding's ``input`` (about 4
    to a token)."""
    messages = request.get("messages")
    if isinstance(messages, list):
        return sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    given = request.get("prompt", request.get("input"))
    if isinstance(given, list):  # texts, token ids, or token arrays: a token id counts as 4 characters
        return sum(_chars(g) if not isinstance(g, list) else sum(map(_chars, g)) for g in given)
    return _chars(given)


def _chars(item: object) -> int:
    if isinstance(item, str):
        return len(item)
    return 4 if isinstance(item, int) else 0


def estimate_tokens(request: dict[str, Any]) -> int:
    """Prompt characters / 4 plus the requested completion budget (256 when unset or not a positive number),
    at least 1 and at most ``MAX_ESTIMATE``."""
    budget = request.get("max_completion_tokens") or request.get("max_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
        budget = 256
    return max(1, int(min(MAX_ESTIMATE, prompt_chars(request) // 4 + min(budget, MAX_ESTIMATE))))
