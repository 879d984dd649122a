"""The API keys the ingest accepts: the config's (``api_keys``, ``LLMQ_API_KEYS``, ``tenants[].api_keys``)
and those of a key file (``server.api_keys_file``, one key a line, its tenant after it or none), read again
when the file changes (checked every ``CHECK_S``) or on SIGHUP, so keys rotate without a restart: add the new
key, move clients over, remove the old one. Write the file whole and rename it into place (as a Kubernetes
Secret volume does): a file read half written would turn keys away until the next check. With a key file
the API is never open, even while the file holds no key."""

from __future__ import annotations

import asyncio
import hashlib
import logging

from llmq.pipeline.keyfile import read_key_file

log = logging.getLogger("llmq.ingest")

CHECK_S = 2.0


class KeyRing:
    def __init__(self, static: list[tuple[str, str | None]], path: str | None) -> None:
        self.static = [(k.encode(), t) for k, t in static]
        self.path = path
        self.keys: list[tuple[bytes, str | None]] = list(self.static)
        """Every key accepted now, with the tenant it belongs to (None: a key of no tenant)."""
        self._seen: bytes | None = None
        self.reload()

    @property
    def secured(self) -> bool:
        """Whether requests need a key: a key is configured, or a key file is (even while it is empty)."""
        return bool(self.static) or self.path is not None

    def reload(self) -> bool:
        """Read the key file again; True when its keys changed. An unreadable file keeps the keys as they
        were (logged): a rotation half done must not lock everyone out, nor let everyone in."""
        if self.path is None:
            return False
        try:
            from_file = read_key_file(self.path, [(k.decode(), t) for k, t in self.static])
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.error("could not read server.api_keys_file %s: %s; the keys stay as they were", self.path, exc)
            return False
        digest = hashlib.sha256(repr([(k, t) for k, t, _ in from_file]).encode()).digest()
        if digest == self._seen:
            return False
        first = self._seen is None
        self._seen = digest
        self.keys = self.static + [(k.encode(), t) for k, t, _ in from_file]
        if not first:
            log.info("API keys reloaded from %s: %d accepted", self.path, len(self.keys))
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            self.reload()
