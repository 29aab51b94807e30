"""HTTP(S) range requests that check what the server sent, with a timeout and retries.

fsspec's HTTP ``cat_ranges`` accepts any 2xx answer: a server that ignores ``Range``
(``python -m http.server``) answers ``200`` with the whole file, and the reader would
slice every sample out of the file's first bytes.  Its default aiohttp timeout is five
minutes, so a frozen server stalls an epoch that long and then fails with an empty
``FSTimeoutError``.  This client runs on fsspec's event loop and session (so the
``storage_options`` that configure fsspec's HTTP filesystem, headers or auth, still
apply) but issues the requests itself:

* a range read must come back ``206`` with a ``Content-Range`` equal to the range asked
  for, else :class:`RangeNotSupported` naming the URL (raised at once: retrying cannot
  help, and the rest of the whole-file body is never downloaded);
* an attempt fails after ``timeout`` seconds without a byte (connecting, or reading);
  refused or reset connections, timeouts and 5xx/429 answers are *transient*: the
  failed ranges are retried after a pause of ``backoff`` seconds, doubling, ``retries``
  times, then :class:`RemoteUnreachable` names the URL, the byte range and what
  happened; 404/410 is :class:`ShardMissing` at once (the server answered: the file is
  not there).

An attempt covers all ranges of a call at once, and the first transient failure ends
the attempt (its other requests are cancelled and retried with it): against a frozen
server every request is stuck alike, so a call fails within :meth:`RetryPolicy.bound`
however many ranges it holds.
"""
from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from .errors import RangeNotSupported, RemoteError, RemoteUnreachable, ShardError, ShardMissing

__all__ = ["RetryPolicy", "HttpRanges", "content_range_error", "checked_length"]

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class RetryPolicy:
    """``timeout``: seconds without a byte before an attempt fails; ``retries``: attempts
    after the first; ``backoff``: the first pause between attempts (then doubled)."""

    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5

    def __post_init__(self):
        if not float(self.timeout) > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.timeout!r}")
        if int(self.retries) < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries!r}")

    def pause(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1 = the first retry)."""
        return min(float(self.backoff) * 2 ** (attempt - 1), float(self.timeout))

    def bound(self) -> float:
        """Worst-case seconds of a failing call: each attempt may spend ``timeout`` on
        connecting and ``timeout`` on reading, plus the pauses."""
        n = int(self.retries)
        return (n + 1) * 2 * float(self.timeout) + sum(self.pause(a) for a in range(1, n + 1))


class _Transient(Exception):
    """A failure worth retrying; ``reason`` says what happened."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _span(start: int | None, end: int | None) -> str:
    return "" if start is None else f" (bytes {start}-{end - 1})"


def _reason(e: BaseException, timeout: float) -> str:
    import aiohttp
    if isinstance(e, asyncio.TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return f"no response within {timeout:g} s"
    if isinstance(e, aiohttp.ClientConnectorError):  # errno says it: "Connection refused"
        code = getattr(e.os_error, "errno", None)
        return f"cannot connect: {os.strerror(code) if code else e}"
    return f"{type(e).__name__}: {e}"


def content_range_error(url: str, start: int, end: int, got: str | None) -> Exception | None:
    """None if a 206's ``Content-Range`` is the range ``[start, end)`` asked for; else the
    error: the shard is shorter than that (truncated), or the server sent another range."""
    m = _CONTENT_RANGE.fullmatch((got or "").strip())
    if m and (int(m[1]), int(m[2])) == (start, end - 1):
        return None
    if m and int(m[1]) == start and m[3] != "*" and int(m[3]) < end:
        return ShardError(f"range beyond the end of {url}{_span(start, end)}: the "
                          f"shard has {m[3]} bytes (truncated or replaced)")
    return RangeNotSupported(
        f"server ignores Range requests: {url} answered 206 with Content-Range "
        f"{got!r} to 'Range: bytes={start}-{end - 1}' (expected bytes "
        f"{start}-{end - 1}/<size>)")


def checked_length(url: str, start: int, end: int, body: bytes) -> bytes:
    """``body`` if it holds the ``end - start`` bytes asked for, else ShardError."""
    if len(body) != end - start:
        raise ShardError(f"short read from {url}{_span(start, end)}: got {len(body)} "
                         f"of {end - start} bytes")
    return body


class HttpRanges:
    """Ranged GETs and HEADs on an fsspec ``HTTPFileSystem``'s loop and session."""

    def __init__(self, fs, policy: RetryPolicy):
        self.fs, self.policy = fs, policy

    # -- public, synchronous ------------------------------------------------------------
    def ranges(self, urls: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        """The bytes ``[start, end)`` of each URL, in order (see the module docstring)."""
        reqs = list(zip(urls, (int(s) for s in starts), (int(e) for e in ends)))
        return self._sync(self._attempts(reqs, self._get_range))

    def size(self, url: str) -> int | None:
        """The file's size from a HEAD request (None if the server does not say)."""
        return self._sync(self._attempts([(url, None, None)], self._head))[0]

    def _sync(self, coro):
        from fsspec.asyn import sync
        return sync(self.fs.loop, lambda: coro)

    # -- one request ------------------------------------------------------------------
    def _timeout(self):
        import aiohttp
        t = float(self.policy.timeout)
        return aiohttp.ClientTimeout(total=None, connect=None, sock_connect=t, sock_read=t)

    def _kwargs(self, extra: dict) -> dict:
        kw = dict(self.fs.kwargs)  # fsspec's request options (headers, auth, ...)
        # identity: a range of the file's own bytes (a compressed answer would be another
        # representation, and servers that compress ignore Range)
        kw["headers"] = {"Accept-Encoding": "identity", **(kw.get("headers") or {}), **extra}
        kw["timeout"] = self._timeout()
        return kw

    def _status(self, r, url: str, start: int | None, end: int | None) -> Exception:
        """The error for an answer other than the one wanted."""
        where = _span(start, end)
        if r.status in (404, 410):
            return ShardMissing(f"shard {url} is missing: the server answered {r.status} "
                                f"{r.reason}{where}")
        if r.status in TRANSIENT_STATUS:
            return _Transient(f"HTTP {r.status} {r.reason}")
        if r.status == 416:
            return ShardError(f"range beyond the end of {url}{where}: the shard is shorter "
                              "than the manifest says (truncated or replaced)")
        if 200 <= r.status < 300 and start is not None:
            return RangeNotSupported(
                f"server ignores Range requests: {url} answered {r.status} {r.reason} to "
                f"'Range: bytes={start}-{end - 1}' (expected 206 Partial Content with that "
                "Content-Range); serve the dataset with a server that supports byte ranges "
                "(nginx, Apache, S3, ...)")
        return RemoteError(f"{url}{where}: the server answered {r.status} {r.reason}")

    async def _target(self, url: str) -> str:
        """The address a GET of ``url`` goes to (messages name ``url`` itself)."""
        return self.fs.encode_url(url)

    async def _get_range(self, session, url: str, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        kw = self._kwargs({"Range": f"bytes={start}-{end - 1}"})
        async with session.get(await self._target(url), **kw) as r:
            if r.status != 206:
                r.close()  # drop the connection: never download a whole-file body
                raise self._status(r, url, start, end)
            bad = content_range_error(url, start, end, r.headers.get("Content-Range", ""))
            if bad is not None:
                r.close()
                raise bad
            body = await r.read()
        return checked_length(url, start, end, body)

    async def _head(self, session, url: str, *_) -> int | None:
        kw = self._kwargs({})
        async with session.head(self.fs.encode_url(url), allow_redirects=True, **kw) as r:
            if r.status in (403, 405, 501):  # no HEAD (e.g. URLs signed for GET): no size
                return None                  # to check; every range answer still is
            if r.status != 200:
                raise self._status(r, url, None, None)
            n = r.headers.get("Content-Length")
            return int(n) if n is not None and n.isdigit() else None

    # -- attempts ---------------------------------------------------------------------
    def _transient(self, e: BaseException) -> str | None:
        """What happened, if ``e`` is a failure worth retrying (a connection that failed
        or broke, no byte in time); None for any other exception."""
        import aiohttp
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                          asyncio.TimeoutError)):
            return _reason(e, float(self.policy.timeout))
        return None

    async def _once(self, fn: Callable[..., Awaitable], session, req) -> object:
        try:
            return await fn(session, *req)
        except Exception as e:  # noqa: BLE001 - sorted by _transient, else re-raised
            reason = self._transient(e)
            if reason is None:
                raise
            raise _Transient(reason) from e

    async def _attempts(self, reqs: list, fn: Callable[..., Awaitable]) -> list:
        """Run ``fn(session, url, start, end)`` for every request, retrying transient
        failures; raise the first permanent error, or RemoteUnreachable at the end."""
        loop = asyncio.get_running_loop()
        session = await self.fs.set_session()
        out: list = [None] * len(reqs)
        done = [False] * len(reqs)
        t0 = loop.time()
        attempts = int(self.policy.retries) + 1
        failure = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.policy.pause(attempt))
            todo = [k for k in range(len(reqs)) if not done[k]]
            tasks = {asyncio.ensure_future(self._once(fn, session, reqs[k])): k for k in todo}
            failure = fatal = None
            pending = set(tasks)
            try:
                while pending and failure is None and fatal is None:
                    finished, pending = await asyncio.wait(pending,
                                                           return_when=asyncio.FIRST_EXCEPTION)
                    for t in finished:
                        k, e = tasks[t], t.exception()
                        if e is None:
                            out[k], done[k] = t.result(), True
                        elif isinstance(e, _Transient):
                            failure = failure or (k, e.reason)
                        else:
                            fatal = fatal or e
            finally:  # a failed attempt ends all its requests (see the module docstring)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
            if fatal is not None:
                raise fatal
            if failure is None:
                return out
        k, reason = failure
        url, start, end = reqs[k]
        p = self.policy
        raise RemoteUnreachable(
            f"server unreachable: {url}{_span(start, end)}: {reason}; {attempts} attempt(s) in "
            f"{loop.time() - t0:.1f} s (request_timeout={p.timeout:g} s, retries={p.retries})")
