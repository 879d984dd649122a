"""The echo backend: chat completions made up in-process, with no latency and no network.

The mock backend answers with them over HTTP; the dispatcher answers ``echo://`` backend URLs with them
directly, a backend kind for measuring the queue itself.
"""

from __future__ import annotations

import os
import time
from typing import Any

from llmq.pipeline.tokens import CHAT, COMPLETIONS, EMBEDDINGS, prompt_chars


def answer(endpoint: str, body: dict[str, Any], *, name: str, default_model: str) -> dict[str, Any]:
    """The made-up answer of ``endpoint`` (one of ``ENDPOINTS``)."""
    if endpoint == "completions":
        return text_completion(body, name=name, default_model=default_model)
    if endpoint == "embeddings":
        return embeddings(body, default_model=default_model)
    return completion(body, name=name, default_model=default_model)


def text_completion(body: dict[str, Any], *, name: str, default_model: str) -> dict[str, Any]:
    """A legacy completion (``POST /v1/completions``) answering ``body``."""
    chat = completion(body, name=name, default_model=default_model, endpoint=COMPLETIONS)
    return chat | {
        "id": "cmpl-" + os.urandom(12).hex(),
        "object": "text_completion",
        "choices": [{"index": 0, "text": f"mock reply from {name}", "finish_reason": "stop", "logprobs": None}],
    }


def embeddings(body: dict[str, Any], *, default_model: str) -> dict[str, Any]:
    """Embeddings (``POST /v1/embeddings``): one 8-number vector per input, made from its length."""
    given = body.get("input")
    inputs = given if isinstance(given, list) else [given]
    data = [
        {"object": "embedding", "index": i, "embedding": [((len(str(x)) + k) % 10) / 10 for k in range(8)]}
        for i, x in enumerate(inputs)
    ]
    tokens = max(1, prompt_chars(body, EMBEDDINGS) // 4)
    return {
        "object": "list",
        "data": data,
        "model": body.get("model") or default_model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def completion(body: dict[str, Any], *, name: str, default_model: str, endpoint: str = CHAT) -> dict[str, Any]:
    """A chat completion answering ``body``, with ``usage`` counted from its messages (about 4 characters
    per token) and at most 16 completion tokens."""
    prompt_tokens = max(1, prompt_chars(body, endpoint) // 4)
    budget = body.get("max_tokens")
    completion_tokens = min(budget, 16) if isinstance(budget, int) and budget > 0 else 16
    return {
        "id": "chatcmpl-" + os.urandom(12).hex(),  # 24 random hex digits, as uuid4().hex[:24] in a fifth the time
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or default_model,
        "system_fingerprint": f"mock-{name}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"mock reply from {name}"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


ECHO_SCHEME = "echo://"
"""Backend URLs with this scheme are answered inside the dispatcher with ``completion``: no HTTP at all."""
