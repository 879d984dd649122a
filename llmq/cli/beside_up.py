"""The servers a running ``llmq-stage up`` started, recorded for the commands run beside it.

``up`` writes ``servers.json`` in its data folder (``$LLMQ_HOME``, ``.llmq`` by default) with the URLs of the
embedded Redis and PostgreSQL it started and its config file, and removes it when it stops. ``status``,
``dlq``, ``pause``, ``resume`` and ``db purge`` run without a config of their own then read the queue that
``up`` runs, instead of the default ``localhost:6379``; they say so. A record left by an ``up`` that was
killed names a process that is gone, and is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

RECORD = "servers.json"


def home(env: Mapping[str, str]) -> Path:
    """The data folder of ``up``: ``$LLMQ_HOME``, else ``.llmq`` (in the current folder)."""
    return Path(env.get("LLMQ_HOME") or ".llmq")


def record(folder: Path, settings: Mapping[str, str]) -> Path:
    """Write the record (the environment ``up`` gives its stages: server URLs, config path), readable by its
    owner alone (a URL may hold a password)."""
    path = folder / RECORD
    partial = folder / f".{RECORD}.{os.getpid()}"
    partial.write_text(json.dumps({"pid": os.getpid(), "env": dict(settings)}))
    partial.chmod(0o600)
    partial.replace(path)
    return path


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)


def recorded(env: Mapping[str, str]) -> tuple[dict[str, str], Path] | None:
    """What a running ``up`` recorded, and where; None when there is no record or its ``up`` is gone."""
    path = home(env) / RECORD
    try:
        doc = json.loads(path.read_text())
        pid, settings = int(doc["pid"]), doc["env"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return {str(k): str(v) for k, v in settings.items()}, path
