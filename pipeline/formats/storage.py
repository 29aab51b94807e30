"""Where a dataset's files live: local paths or fsspec URLs (the one URL predicate), and
the bounded fetch of a dataset's remote metadata (header, columns, sizes).

``s3://`` goes through s3fs (botocore): endpoint and credentials come from
``storage_options`` (``endpoint_url``, ``key``, ``secret``, ...) or, where those do not
say, from botocore's own sources (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``~/.aws``)."""
from __future__ import annotations

__all__ = ["is_url", "is_http", "is_s3", "local_path", "METADATA_TIMEOUT", "fs_options", "missing_bucket",
           "filesystem", "pin", "read_url", "connection_failure", "unreachable", "access_denied"]

# seconds without a byte from the server before a metadata request fails: aiohttp's own
# default waits five minutes on a frozen server, then raises an empty FSTimeoutError
METADATA_TIMEOUT = 30.0


def is_url(path: str) -> bool:
    """True for fsspec URLs (``scheme://``: http(s), s3, gs, ...) other than ``file://``."""
    return "://" in str(path) and not str(path).startswith("file://")


def is_http(path: str) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return str(path).lower().startswith(("http://", "https://"))


def is_s3(path: str) -> bool:
    """True for ``s3://`` URLs."""
    return str(path).lower().startswith("s3://")


def local_path(path: str) -> str:
    """``file://`` stripped; other paths unchanged."""
    p = str(path)
    return p[len("file://"):] if p.startswith("file://") else p


def fs_options(url: str, timeout: float | None = None, storage_options: dict | None = None,
               retries: int | None = None) -> dict:
    """fsspec keyword arguments for ``url``: ``storage_options`` plus a bound on every
    request: http(s) and s3 requests fail after ``timeout`` seconds (default
    :data:`METADATA_TIMEOUT`) without a byte (connecting or reading).  For s3,
    ``retries`` (if given) is the number of botocore attempts after the first (the read
    stage passes 0: it retries itself, read/remote.py); options the caller gave win."""
    opts = dict(storage_options or {})
    timeout = float(timeout or METADATA_TIMEOUT)
    if is_http(url):
        import aiohttp
        t = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        return {**opts, "client_kwargs": {"timeout": t, **opts.get("client_kwargs", {})}}
    if is_s3(url):
        # connections: the read stage sends every range of a batch at once (botocore: 10)
        config = {"connect_timeout": timeout, "read_timeout": timeout, "max_pool_connections": 64}
        if retries is not None:
            config["retries"] = {"total_max_attempts": int(retries) + 1}
        return {**opts, "config_kwargs": {**config, **opts.get("config_kwargs", {})}}
    return opts


def connection_failure(e: BaseException) -> BaseException | None:
    """The refused/reset/timed-out connection (or 5xx answer) behind ``e``, else None.
    fsspec's HTTP ``size``/``info`` turns every failure into FileNotFoundError (the cause
    kept), so a dead or failing server would read as a missing file; botocore's
    connection errors are no OSError at all."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and not isinstance(x, FileNotFoundError | PermissionError):
            return x
        if int(getattr(x, "status", 0) or 0) >= 500:  # aiohttp.ClientResponseError
            return x
        if x is not None and _botocore_connection(x):
            return x
    return None


def _botocore_connection(e: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnection, HTTPClientError
    except ImportError:
        return False
    return isinstance(e, BotoConnection | HTTPClientError)


def unreachable(url: str, e: BaseException) -> str:
    """The message for a server that did not answer (refused, reset, timed out)."""
    detail = str(e) or "no response in time"  # FSTimeoutError says nothing
    return f"server unreachable: {url} ({type(e).__name__}: {detail})"


def access_denied(url: str, e: BaseException) -> str:
    """The message for a server that refused the credentials (S3 403)."""
    return (f"access denied: {url} ({e}); check the credentials (storage_options key/secret, "
            "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the endpoint")


# Every file system the project makes stays referenced for the life of the process.
# fsspec empties its instance cache in a forked child (the Loader's reader processes); an
# instance only the cache (or a dropped reader) held is then collected there, and its
# finalizer closes the parent's connections from the child: s3fs closes its client on the
# child's event loop ("Task exception was never retrieved ... attached to a different
# loop" on stderr), and closing a transport unregisters its socket from the epoll instance
# that parent and child share, so the parent's next request on that pooled connection
# waits for an answer it is never told about. Kept alive, they are left alone.
_PINNED: dict[int, object] = {}


def pin(fs):
    """``fs``, kept referenced for the life of the process (see ``_PINNED``)."""
    _PINNED.setdefault(id(fs), fs)
    return fs


def filesystem(url: str, **options):
    """``(fs, path)`` for ``url`` (``fsspec.core.url_to_fs``), the instance pinned."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(url, **options)
    return pin(fs), path


def read_url(url: str, storage_options: dict | None = None) -> bytes:
    """The whole file at ``url`` (:func:`fs_options`).  FileNotFoundError when the server
    says it is absent; PermissionError naming the URL when it refuses the credentials;
    ConnectionError naming the URL when the server cannot be reached."""
    try:
        fs, path = filesystem(url, **fs_options(url, storage_options=storage_options))
        with fs.open(path, "rb") as f:
            return f.read()
    except PermissionError as e:
        raise PermissionError(access_denied(url, e)) from e
    except Exception as e:  # refused, reset, or FSTimeoutError (a TimeoutError): no answer
        if type(e).__name__ == "NoCredentialsError":   # botocore's, without importing it
            raise PermissionError(f"{url}: no credentials for the object store: set "
                                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass "
                                  "storage_options={'key': ..., 'secret': ...}") from e
        fail = connection_failure(e)
        if fail is None:
            raise
        raise ConnectionError(unreachable(url, fail)) from e


def missing_bucket(url: str, storage_options: dict | None = None) -> str | None:
    """The bucket of an ``s3://`` URL when the store says it does not exist; None for other
    URLs, an existing bucket, or a store that does not answer the question (the caller
    then reports the object as missing, which is still true)."""
    if not is_s3(url):
        return None
    bucket = url[len("s3://"):].split("/", 1)[0]
    try:
        fs, _ = filesystem(url, **fs_options(url, storage_options=storage_options))
        return None if fs.exists(bucket) else bucket
    except Exception:  # noqa: BLE001 - no answer is no answer
        return None
