"""Streamed chat completions (OpenAI's ``chat.completion.chunk``): making them up (the mock backend) and
assembling the whole completion from them (the dispatcher, so a streamed answer is archived like any other).
"""

from __future__ import annotations

import os
import time
from typing import Any

from llmq.pipeline.echo import prompt_chars


def made_up_chunks(
    body: dict[str, Any], *, name: str, default_model: str, tokens: int, legacy: bool = False
) -> list[dict[str, Any]]:
    """The chunks of a made-up answer of ``tokens`` tokens (one word each): a first chunk with the role, one
    per token, one with the finish reason, and one with ``usage`` when ``stream_options.include_usage``. A
    ``legacy`` completion's chunks carry ``text``."""
    base = {
        "id": ("cmpl-" if legacy else "chatcmpl-") + os.urandom(12).hex(),
        "object": "text_completion" if legacy else "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model") or default_model,
        "system_fingerprint": f"mock-{name}",
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if legacy:
            text = delta.get("content", "")
            return base | {"choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
        return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": f"t{i} "}) for i in range(tokens)]
    out.append(chunk({}, "stop"))
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        prompt = max(1, prompt_chars(body) // 4)
        usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
        out.append(base | {"choices": [], "usage": usage})
    return out


class Assembler:
    """Collects a stream's chunks into the completion a non-streamed call would have answered."""

    def __init__(self) -> None:
        self.first: dict[str, Any] | None = None
        self.parts: dict[int, list[str]] = {}
        self.roles: dict[int, str] = {}
        self.finish: dict[int, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        """Chunks that carried content (a token, most often)."""

    def add(self, chunk: dict[str, Any]) -> None:
        if self.first is None:
            self.first = chunk
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            given = choice.get("index")
            index = given if isinstance(given, int) and not isinstance(given, bool) and 0 <= given < 128 else 0
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("role"), str):
                    self.roles[index] = delta["role"]
                content = delta.get("content")
                if isinstance(content, str) and content:
                    self.parts.setdefault(index, []).append(content)
                    self.chunks += 1
            text = choice.get("text")  # a legacy completion's chunk
            if isinstance(text, str) and text:
                self.parts.setdefault(index, []).append(text)
                self.chunks += 1
            if choice.get("finish_reason") is not None:
                self.finish[index] = choice["finish_reason"]

    def completion(self) -> dict[str, Any]:
        """The whole completion so far (a partial one when the stream broke off)."""
        first = self.first or {}
        indexes = sorted(set(self.parts) | set(self.roles) | set(self.finish)) or [0]
        if first.get("object") == "text_completion":
            texts = [
                {
                    "index": i,
                    "text": "".join(self.parts.get(i, [])),
                    "finish_reason": self.finish.get(i),
                    "logprobs": None,
                }
                for i in indexes
            ]
            legacy = {"id": first.get("id"), "object": "text_completion", "created": first.get("created")}
            return (
                legacy | {"model": first.get("model"), "choices": texts} | ({"usage": self.usage} if self.usage else {})
            )
        choices = [
            {
                "index": i,
                "message": {"role": self.roles.get(i, "assistant"), "content": "".join(self.parts.get(i, []))},
                "finish_reason": self.finish.get(i),
                "logprobs": None,
            }
            for i in indexes
        ]
        doc: dict[str, Any] = {
            "id": first.get("id"),
            "object": "chat.completion",
            "created": first.get("created"),
            "model": first.get("model"),
            "choices": choices,
        }
        if first.get("system_fingerprint") is not None:
            doc["system_fingerprint"] = first["system_fingerprint"]
        if self.usage is not None:
            doc["usage"] = self.usage
        return doc
