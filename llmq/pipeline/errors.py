"""The project's exceptions. Library errors are translated into these where they cross a boundary."""

from __future__ import annotations


class LlmqError(Exception):
    """Base of every error llmq raises on purpose."""


class ConfigError(LlmqError):
    """The configuration is invalid; ``problems`` holds one ``path: reason`` line per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} error(s): " + "; ".join(problems))


class ConnectError(LlmqError):
    """A server (Redis, Postgres) could not be reached within the allowed time."""


class ListenError(LlmqError):
    """A stage's port could not be bound (already in use, or not permitted)."""


class ConsumerNameTaken(LlmqError):
    """Another live process holds the consumer name this process asked for."""


class GiveBack(LlmqError):
    """Raised by a stage to leave its batch pending without an error, e.g. when shutting down mid-retry."""
