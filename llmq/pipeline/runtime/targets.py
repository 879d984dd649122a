"""A stage process's ops address, announced to Prometheus through a file (``metrics.targets_dir``).

Prometheus finds processes it was not told of by reading a folder of target files (``file_sd_configs``):
each stage process writes ``<stage>-<consumer>.json`` there once its ops port is bound, and removes it when
it stops cleanly. A second dispatcher started on one host with ``--port 0`` is scraped as soon as it runs;
one that was killed leaves its file, so its target shows down (``LlmqStageDown``) until someone looks.
The file is written whole and renamed into place: Prometheus never reads half of one.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

_ALL_INTERFACES = frozenset({"", "0.0.0.0", "::"})


def address(host: str, port: int) -> str:
    """Where Prometheus reaches a port bound on ``host``: the machine's name when bound on every interface."""
    name = socket.gethostname() if host in _ALL_INTERFACES else host
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def announce(folder: str, *, stage: str, consumer: str, host: str, port: int) -> Path:
    """Write this process's target file; return its path (for ``withdraw``)."""
    path = Path(folder) / f"{stage}-{consumer}.json"
    doc = [{"targets": [address(host, port)], "labels": {"job": f"llmq-{stage}", "stage": stage, "consumer": consumer}}]
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(doc))
    partial.replace(path)
    return path


def withdraw(path: Path) -> None:
    path.unlink(missing_ok=True)
