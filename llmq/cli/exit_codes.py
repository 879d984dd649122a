"""Named exit codes, so supervisors and scripts can tell why a stage stopped."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    """An unexpected error (logged with its traceback)."""
    USAGE = 2
    """Bad command line (typer's own code)."""
    CONFIG = 3
    """The configuration is invalid; the errors were printed with their paths."""
    CONNECT = 4
    """Redis or Postgres could not be reached within the connect timeout."""
    CONSUMER_NAME = 5
    """The consumer name is held by another live process."""
    EMBEDDED = 6
    """An embedded server could not be started (is the ``embedded`` extra installed?)."""
    LISTEN = 7
    """The stage's port could not be bound (already in use, or not permitted)."""
    INTERRUPTED = 130
    """A second SIGINT/SIGTERM arrived during shutdown: exited at once."""
