"""Logging: one JSON object per line (or text for a terminal), with stage/consumer/message context.

The file handler reopens its file on request, which the CLI wires to SIGUSR1 for logrotate.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import msgspec

from llmq.pipeline.config import LoggingConfig

# Attributes every LogRecord has; anything else was passed with ``extra=`` and goes into the line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured duplicate of msg
}
_json = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict[str, str]) -> None:
        super().__init__()
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _json.encode(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self, static: dict[str, str]) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.prefix = " ".join(f"{k}={v}" for k, v in static.items())

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        text = super().format(record)
        tail = " ".join(x for x in (self.prefix, extras) if x)
        return f"{text} [{tail}]" if tail else text


class ReopenableFileHandler(logging.StreamHandler[TextIO]):
    """Appends to a file and reopens it on ``reopen()`` (after logrotate moved it away)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(open(path, "a", encoding="utf-8"))  # noqa: SIM115 - owned by the handler

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            self.stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self.stream.close()
        finally:
            self.release()
        super().close()


def setup_logging(cfg: LoggingConfig, **static: str) -> logging.Handler:
    """Configure the root logger once per process; return the handler (for ``reopen_logs``)."""
    handler: logging.Handler
    if cfg.output in ("stdout", "stderr"):
        handler = logging.StreamHandler(sys.stdout if cfg.output == "stdout" else sys.stderr)
    else:
        handler = ReopenableFileHandler(cfg.output)
    handler.setFormatter(JsonFormatter(static) if cfg.format == "json" else TextFormatter(static))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(cfg.level.upper())
    # Access logs of the ops endpoints would drown the stage's own lines (requests are counted in metrics)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return handler


def reopen_logs(handler: logging.Handler) -> None:
    if isinstance(handler, ReopenableFileHandler):
        handler.reopen()
