"""S3 range reads (``s3://bucket/key``) with the same checks, timeouts and retries as HTTP.

The requests go through the aiobotocore client of an s3fs ``S3FileSystem`` (its loop,
credentials, endpoint and signing), not through s3fs's ``cat_ranges``: s3fs retries
on its own (five times, with pauses up to 15 s) and botocore once more beneath it, so a
dead endpoint would stall an epoch for minutes.  The file system the reader opens has
botocore's retries off and its connect/read timeouts set to the request timeout
(formats/storage.py ``fs_options``); the attempts are counted here, as for HTTP
(read/remote.py): one ``GetObject`` with a single ``Range`` per merged range (S3 servers
such as SeaweedFS answer a multi-range request with the whole object), all ranges of a
call in flight at once, every answer checked (206 and the ``Content-Range`` asked for).

Errors: ``NoSuchKey`` / ``NoSuchBucket`` (404) are :class:`ShardMissing` at once;
refused credentials (403: ``SignatureDoesNotMatch``, ``InvalidAccessKeyId``,
``AccessDenied``) :class:`AccessDenied`; 5xx / ``SlowDown`` / 429, refused or broken
connections and timeouts are retried with backoff, then :class:`RemoteUnreachable`
names ``s3://bucket/key`` and the byte range.
"""
from __future__ import annotations

import asyncio

from .errors import AccessDenied, RangeNotSupported, RemoteError, ShardError, ShardMissing
from .remote import (TRANSIENT_STATUS, HttpRanges, _reason, _span, _Transient, checked_length,
                     content_range_error)

__all__ = ["S3Ranges", "split_s3"]

_MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED = frozenset({"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId",
                     "InvalidToken", "ExpiredToken", "403"})
_BUSY = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                   "Throttling", "ThrottlingException"})


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ValueError(f"not an s3://bucket/key URL: {url!r}")
    return bucket, key


class S3Ranges(HttpRanges):
    """Ranged ``GetObject`` and ``HeadObject`` on an s3fs ``S3FileSystem``'s client
    (``fs.set_session()`` gives it); retries, timeouts and bounds as :class:`HttpRanges`."""

    def _client_error(self, e, url: str, start: int | None, end: int | None) -> Exception:
        """The error for an S3 error answer (a botocore ``ClientError``)."""
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        what = f"{status} {code}: {err.get('Message', '')}".strip()
        where = _span(start, end)
        if code in _MISSING or status in (404, 410):
            return ShardMissing(f"shard {url} is missing: the server answered {what}{where}")
        if code in _DENIED or status == 403:
            return AccessDenied(
                f"access denied to {url}{where}: the server answered {what}; check the "
                "credentials (storage_options key/secret, or AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY) and the endpoint (endpoint_url / AWS_ENDPOINT_URL)")
        if code in _BUSY or status in TRANSIENT_STATUS:
            return _Transient(f"S3 {what}")
        if code == "InvalidRange" or status == 416:
            return ShardError(f"range beyond the end of {url}{where}: the shard is shorter "
                              "than the manifest says (truncated or replaced)")
        return RemoteError(f"{url}{where}: the server answered {what}")

    async def _get_range(self, client, url: str, start: int, end: int) -> bytes:
        from botocore.exceptions import ClientError
        if start >= end:
            return b""
        bucket, key = split_s3(url)
        try:
            r = await client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        except ClientError as e:
            raise self._client_error(e, url, start, end) from e
        status = int(r.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status != 206:  # the whole object: never read it
            bad: Exception | None = RangeNotSupported(
                f"server ignores Range requests: {url} answered {status} to 'Range: "
                f"bytes={start}-{end - 1}' (expected 206 Partial Content with that range)")
        else:
            bad = content_range_error(url, start, end, r.get("ContentRange"))
        if bad is not None:
            r["Body"].close()
            raise bad
        async with r["Body"] as body:
            return checked_length(url, start, end, await body.read())

    async def _head(self, client, url: str, *_) -> int | None:
        from botocore.exceptions import ClientError
        bucket, key = split_s3(url)
        try:
            r = await client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            raise self._client_error(e, url, None, None) from e
        return int(r["ContentLength"])

    def _transient(self, e: BaseException) -> str | None:
        from botocore.exceptions import ConnectionError as BotoConnection, HTTPClientError
        if isinstance(e, (BotoConnection, HTTPClientError)):
            cause = getattr(e, "kwargs", {}).get("error")  # the aiohttp / socket error
            if "Timeout" in type(e).__name__:  # ReadTimeoutError, ConnectTimeoutError
                return _reason(asyncio.TimeoutError(), float(self.policy.timeout))
            if isinstance(cause, BaseException):
                return _reason(cause, float(self.policy.timeout))
            return f"{type(e).__name__}: {e}"
        return super()._transient(e)
