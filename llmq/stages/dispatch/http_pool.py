"""HTTP to backends: one aiohttp session per dispatcher. The rest of the stage sees only what is here: ``Pool``
(``post``, ``get``, ``stream``), ``Answer`` (a whole answer), ``Reply`` (one read as it comes), ``HTTPError``
(a call that failed on the way) and ``Unsendable`` (a request that cannot be sent as configured).

The client was chosen by measurement (``benchmarks/http_clients.py``, figures in RESULTS.md): against nginx
answering a fixed completion, on one process, aiohttp made 5,211 / 11,265 / 12,798 / 10,090 requests/s at
1 / 8 / 64 / 256 in flight, httpx 1,733 / 1,723 / 174 / 72 with one client (its pool re-matches every queued
request against every connection, encode/httpx#3215) and 1,627 / 1,751 / 1,885 / 1,603 in shards of four
connections, the workaround llmq used until then. LLM traffic is hundreds of long calls in flight.
"""

from __future__ import annotations

import codecs
import contextlib
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

SPARE_CONNECTIONS = 16
"""Connections past the calls a dispatcher may hold: room for health probes."""


class HTTPError(Exception):
    """The call failed on the way: no connection, a reset, a body cut short. (A timeout raises TimeoutError.)
    Its text names no URL credentials."""


class Unsendable(HTTPError):
    """The request cannot be sent as configured (a header with a line break in it, a proxy setting aiohttp
    refuses): sending it again would fail the same way, and the backend is not at fault."""


class Answer:
    """A backend's whole answer."""

    __slots__ = ("content", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str] | None = None, content: bytes = b"") -> None:
        self.status = status
        self.headers: Mapping[str, str] = (
            headers if isinstance(headers, CIMultiDictProxy) else CIMultiDict(headers or {})
        )
        self.content = content

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        """The body as text, in the charset its Content-Type names (UTF-8 when none, an unknown one, or a codec
        that is no text encoding, as base64); bytes that do not decode become U+FFFD."""
        try:
            return self.content.decode(_charset(self.headers.get("content-type", "")), errors="replace")
        except LookupError:  # codecs.lookup knows base64 and zip, which str.decode refuses
            return self.content.decode("utf-8", errors="replace")


class Reply:
    """An answer being read as it comes (a streamed call's)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    async def read(self) -> Answer:
        """The rest of the body, whole."""
        with _errors():
            return Answer(self.status, self._response.headers, await self._response.read())

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body in the pieces it arrives in."""
        with _errors():
            async for piece in self._response.content.iter_any():
                yield piece


class Pool:
    """Keep-alive connections to every backend, at most ``concurrency`` (plus spares) at once. Made inside the
    running event loop; ``read_timeout_s`` bounds each read, ``connect_timeout_s`` each connect.

    As httpx did before it: redirects are not followed (a 3xx is the backend's answer, classified as such:
    following one would turn the POST into a GET and store another resource's body as the completion), and
    the environment's proxies (HTTP_PROXY, HTTPS_PROXY, NO_PROXY, read once) apply. No cookies are kept, and
    no ~/.netrc is read (aiohttp's trust_env would send its logins to every backend, and read it, and the
    proxies, in a thread on every call: a third of the rate)."""

    def __init__(self, *, concurrency: int, connect_timeout_s: float, read_timeout_s: float) -> None:
        connector = aiohttp.TCPConnector(limit=concurrency + SPARE_CONNECTIONS, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, raise_for_status=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        self._proxies = urllib.request.getproxies_environment()
        self._proxy_of: dict[tuple[str, str], str | None] = {}

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        with _errors():
            async with self._post(url, body, headers) as response:
                return Answer(response.status, response.headers, await response.read())

    async def get(self, url: str, *, timeout_s: float) -> Answer:
        with _errors():
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._session.get(
                url, timeout=timeout, allow_redirects=False, proxy=self._proxy(url)
            ) as response:
                return Answer(response.status, response.headers, await response.read())

    @contextlib.asynccontextmanager
    async def stream(self, url: str, body: bytes, headers: Mapping[str, str]) -> AsyncIterator[Reply]:
        """POST ``body``; the answer as it comes. Leaving the block before the end of the body closes the
        connection (the backend sees its client gone and can stop generating). Errors of the block's own
        code pass through as they are."""
        with _errors():
            response = await self._post(url, body, headers)
        try:
            yield Reply(response)
        finally:
            if response.content.at_eof():
                response.release()  # read to its end: the connection goes back to the pool
            else:
                response.close()

    async def aclose(self) -> None:
        await self._session.close()

    def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> aiohttp.client._RequestContextManager:
        """A JSON POST: no redirect followed, through the environment's proxy for ``url``."""
        headers = {"Content-Type": "application/json", **headers}
        return self._session.post(url, data=body, headers=headers, allow_redirects=False, proxy=self._proxy(url))

    def _proxy(self, url: str) -> str | None:
        """The proxy the environment names for ``url``'s scheme, unless NO_PROXY exempts its host (once per
        scheme and host)."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "")
        if key not in self._proxy_of:
            proxy = self._proxies.get(parts.scheme)
            bypass = proxy is not None and bool(urllib.request.proxy_bypass(key[1]))  # NO_PROXY
            self._proxy_of[key] = None if bypass else proxy
        return self._proxy_of[key]


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """aiohttp's errors as ``HTTPError``, and the ValueError of a request it refuses to send (a header with a
    control character in it) as ``Unsendable``; its timeouts stay TimeoutError (some are both)."""
    try:
        yield
    except TimeoutError:
        raise
    except aiohttp.InvalidURL as exc:
        raise Unsendable("the backend's URL is not valid") from exc
    except aiohttp.ClientResponseError as exc:  # its text has the whole URL; the status and reason say enough
        raise HTTPError(f"{type(exc).__name__}: {exc.status}, {exc.message}") from exc
    except aiohttp.ClientError as exc:
        raise HTTPError(_CREDENTIALS.sub(r"\1***@", f"{type(exc).__name__}: {exc}")) from exc
    except ValueError as exc:
        raise Unsendable(_CREDENTIALS.sub(r"\1***@", f"{type(exc).__name__}: {exc}")) from exc


_CREDENTIALS = re.compile(r"(//)[^/@\s]+@")
"""The user and password of a URL (``//user:secret@host``): never in an error, which is stored and logged."""


def _charset(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            try:
                return codecs.lookup(value.strip().strip('"')).name
            except LookupError:
                break
    return "utf-8"
