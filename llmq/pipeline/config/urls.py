"""Whether a URL falls under an allowed prefix (``webhooks.endpoints[].url``), compared by its parts, never as
text: the same scheme, host and port, and a path inside the prefix's path.

Text comparison let ``https://hooks.example.com@evil.test/`` (user info), ``https://hooks.example.com.evil
.test/`` (a longer host) and ``https://hooks.example.com/a/../admin`` (dot segments, which the HTTP client
resolves before sending) pass a prefix they are not under. A URL with user info, dot segments (plain or
percent-encoded), a backslash, or any character that is not printable ASCII is under no prefix.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote, urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


class _Parts(NamedTuple):
    scheme: str
    host: str
    port: int
    path: str


def within(prefix: str, url: str) -> bool:
    """Whether ``url`` is under ``prefix``: a path prefix ending with "/" holds what starts with it; one that
    does not, itself and what is below it (``/hooks`` holds ``/hooks`` and ``/hooks/a``, not ``/hooksx``)."""
    base, given = _parts(prefix), _parts(url)
    if base is None or given is None or (base.scheme, base.host, base.port) != (given.scheme, given.host, given.port):
        return False
    if base.path.endswith("/"):
        return given.path.startswith(base.path)
    return given.path == base.path or given.path.startswith(base.path + "/")


def _parts(url: str) -> _Parts | None:
    if not url.isascii() or not url.isprintable() or "\\" in url or " " in url:
        return None
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError:
        return None
    scheme = split.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not split.hostname or split.username is not None or "@" in split.netloc:
        return None
    path = split.path or "/"
    if any(segment in (".", "..") for segment in unquote(path).split("/")):
        return None
    return _Parts(scheme, split.hostname.lower(), port or _DEFAULT_PORTS[scheme], path)
