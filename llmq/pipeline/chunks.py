"""Streamed chat completions (OpenAI's ``chat.completion.chunk``): making them up (the mock backend) and
assembling the whole completion from them (the dispatcher, so a streamed answer is archived like any other).
"""

from __future__ import annotations

import os
import time
from typing import Any

from llmq.pipeline.tokens import CHAT, COMPLETIONS, prompt_chars


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
        prompt = max(1, prompt_chars(body, COMPLETIONS if legacy else CHAT) // 4)
        usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
        out.append(base | {"choices": [], "usage": usage})
    return out


STREAMED_TEXT = ("reasoning_content", "reasoning", "refusal")
"""Fields besides ``content`` whose text a delta streams in pieces."""


class Assembler:
    """Collects a stream's chunks into the completion a non-streamed call would have answered."""

    def __init__(self) -> None:
        self.first: dict[str, Any] | None = None
        self.parts: dict[int, list[str]] = {}
        self.roles: dict[int, str] = {}
        self.finish: dict[int, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.texts: dict[tuple[int, str], list[str]] = {}
        """Other text a delta streams in pieces (``reasoning_content``, ``refusal``), by choice and field."""
        self.tools: dict[int, dict[int, dict[str, Any]]] = {}
        """Tool calls by choice and tool-call index: id, type, and the function's name and arguments so far."""
        self.logprobs: dict[int, list[Any]] = {}
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
                for field in STREAMED_TEXT:
                    if isinstance(delta.get(field), str):
                        self.texts.setdefault((index, field), []).append(delta[field])
                if isinstance(delta.get("tool_calls"), list):
                    self._tool_calls(index, delta["tool_calls"])
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                self.logprobs.setdefault(index, []).extend(logprobs["content"])
            text = choice.get("text")  # a legacy completion's chunk
            if isinstance(text, str) and text:
                self.parts.setdefault(index, []).append(text)
                self.chunks += 1
            if choice.get("finish_reason") is not None:
                self.finish[index] = choice["finish_reason"]

    def _tool_calls(self, index: int, calls: list[Any]) -> None:
        tools = self.tools.setdefault(index, {})
        for call in calls:
            if not isinstance(call, dict):
                continue
            given = call.get("index")
            at = given if isinstance(given, int) else len(tools)
            tool = tools.setdefault(at, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            for key in ("id", "type"):
                if isinstance(call.get(key), str):
                    tool[key] = call[key]
            function = call.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    tool["function"]["name"] += function["name"]
                if isinstance(function.get("arguments"), str):
                    tool["function"]["arguments"] += function["arguments"]

    def _message(self, i: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.roles.get(i, "assistant"), "content": "".join(self.parts.get(i, []))}
        for field in STREAMED_TEXT:
            if (i, field) in self.texts:
                message[field] = "".join(self.texts[(i, field)])
        if i in self.tools:
            message["tool_calls"] = [self.tools[i][at] for at in sorted(self.tools[i])]
            if not message["content"]:
                message["content"] = None  # as a non-streamed tool call answers
        return message

    def completion(self) -> dict[str, Any]:
        """The whole completion so far (a partial one when the stream broke off)."""
        first = self.first or {}
        indexes = sorted(set(self.parts) | set(self.roles) | set(self.finish) | set(self.tools)) or [0]
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
                "message": self._message(i),
                "finish_reason": self.finish.get(i),
                "logprobs": {"content": self.logprobs[i]} if i in self.logprobs else None,
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
