"""What a request costs in tokens before it runs: the characters its endpoint's backend reads as the prompt
(about 4 to a token) and its completion budget, for every choice it asks for. The dispatcher's tpm limits,
the tenants' tpm quotas and their fair shares all count this estimate; the echo backend reports prompt
tokens by the same count.

Each endpoint is counted by the fields its backend reads, and by those alone: a chat's messages (their
contents, names and tool calls) and tool definitions, a legacy completion's ``prompt``, an embedding's
``input``. A field of another endpoint's in the body counts nothing, and hides nothing either."""

from __future__ import annotations

from typing import Any

import msgspec

CHAT, COMPLETIONS, EMBEDDINGS = "chat/completions", "completions", "embeddings"
MAX_ESTIMATE = 10**9
"""No estimate is larger: a client's max_tokens of 1e15 must not overflow a minute's token counter."""
DEFAULT_BUDGET = 256
"""The completion budget of a request that sets none (or one that is not a positive number)."""
_MESSAGE_FIELDS = ("content", "name", "tool_calls", "function_call")


def prompt_chars(request: dict[str, Any], endpoint: str = CHAT) -> int:
    """Characters of what ``endpoint``'s backend reads as the prompt of ``request``: a token id counts as 4."""
    if endpoint == EMBEDDINGS:
        return _texts(request.get("input"))
    if endpoint == COMPLETIONS:
        return _texts(request.get("prompt"))
    total = _size(request.get("tools")) + _size(request.get("functions"))
    messages = request.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                total += sum(_size(m.get(field)) for field in _MESSAGE_FIELDS)
    return total


def estimate_tokens(request: dict[str, Any], endpoint: str = CHAT) -> int:
    """The prompt's characters / 4, plus the completion budget times the choices asked for (``n``, and a
    legacy completion's ``best_of``); an embedding has no completion. At least 1, at most ``MAX_ESTIMATE``."""
    prompt = prompt_chars(request, endpoint) // 4
    if endpoint == EMBEDDINGS:
        return max(1, min(MAX_ESTIMATE, prompt))
    fields = ("max_tokens",) if endpoint == COMPLETIONS else ("max_completion_tokens", "max_tokens")
    budgets = [b for b in (_positive(request.get(f)) for f in fields) if b is not None]
    budget = max(budgets) if budgets else DEFAULT_BUDGET
    choices = max(_positive(request.get("n")) or 1, _positive(request.get("best_of")) or 1)
    return max(1, int(min(MAX_ESTIMATE, prompt + min(budget, MAX_ESTIMATE) * min(choices, MAX_ESTIMATE))))


def _positive(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return None
    return min(float(value), float(MAX_ESTIMATE))


def _texts(given: object) -> int:
    """Texts, token ids, or arrays of token ids (a batch), as a completion's prompt or an embedding's input."""
    if isinstance(given, list):
        return sum(sum(map(_chars, g)) if isinstance(g, list) else _chars(g) for g in given)
    return _chars(given)


def _chars(item: object) -> int:
    if isinstance(item, str):
        return len(item)
    return 4 if isinstance(item, int) and not isinstance(item, bool) else 0


def _size(value: object) -> int:
    """A text's length, or the length of anything else as the JSON the backend reads."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    try:
        return len(msgspec.json.encode(value))
    except (TypeError, OverflowError, RecursionError, msgspec.EncodeError):
        return 0
