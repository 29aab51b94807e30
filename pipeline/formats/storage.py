"""Where a dataset's files live: local paths or fsspec URLs (the one URL predicate), and
the bounded fetch of a dataset's remote metadata (header, columns, sizes)."""
from __future__ import annotations

__all__ = ["is_url", "is_http", "local_path", "METADATA_TIMEOUT", "fs_options", "read_url",
           "connection_failure", "unreachable"]

# seconds without a byte from the server before a metadata request fails: aiohttp's own
# default waits five minutes on a frozen server, then raises an empty FSTimeoutError
METADATA_TIMEOUT = 30.0


def is_url(path: str) -> bool:
    """True for fsspec URLs (``scheme://``: http(s), s3, gs, ...) other than ``file://``."""
    return "://" in str(path) and not str(path).startswith("file://")


def is_http(path: str) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return str(path).lower().startswith(("http://", "https://"))


def local_path(path: str) -> str:
    """``file://`` stripped; other paths unchanged."""
    p = str(path)
    return p[len("file://"):] if p.startswith("file://") else p


def fs_options(url: str, timeout: float | None = None) -> dict:
    """fsspec keyword arguments for ``url``: http(s) requests fail after ``timeout`` seconds
    (default :data:`METADATA_TIMEOUT`) without a byte (connecting or reading); other
    schemes keep their own settings."""
    if not is_http(url):
        return {}
    import aiohttp
    timeout = float(timeout or METADATA_TIMEOUT)
    t = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    return {"client_kwargs": {"timeout": t}}


def connection_failure(e: BaseException) -> BaseException | None:
    """The refused/reset/timed-out connection (or 5xx answer) behind ``e``, else None.
    fsspec's HTTP ``size``/``info`` turns every failure into FileNotFoundError (the cause
    kept), so a dead or failing server would read as a missing file."""
    for x in (e, e.__cause__):
        if isinstance(x, OSError) and not isinstance(x, FileNotFoundError):
            return x
        if int(getattr(x, "status", 0) or 0) >= 500:  # aiohttp.ClientResponseError
            return x
    return None


def unreachable(url: str, e: BaseException) -> str:
    """The message for a server that did not answer (refused, reset, timed out)."""
    detail = str(e) or "no response in time"  # FSTimeoutError says nothing
    return f"server unreachable: {url} ({type(e).__name__}: {detail})"


def read_url(url: str) -> bytes:
    """The whole file at ``url`` (:func:`fs_options`).  FileNotFoundError when the server
    says it is absent; ConnectionError naming the URL when the server cannot be reached."""
    import fsspec
    try:
        with fsspec.open(url, "rb", **fs_options(url)) as f:
            return f.read()
    except OSError as e:  # refused, reset, or FSTimeoutError (a TimeoutError): no answer
        fail = connection_failure(e)
        if fail is None:
            raise
        raise ConnectionError(unreachable(url, fail)) from e
