"""S3 range reads (``s3://bucket/key``) with the same checks, timeouts and retries as HTTP.

Each object is presigned once per process (a ``GetObject`` URL from the aiobotocore
client of an s3fs ``S3FileSystem``: its endpoint, credentials and signing; renewed well
before it expires), and the ranges are then plain HTTP GETs through :class:`HttpRanges`
(read/remote.py): one ``Range`` per merged range (S3 servers such as SeaweedFS answer a
multi-range request with the whole object), every range of a call in flight at once,
every answer checked (206 and the ``Content-Range`` asked for), the same timeouts,
retries and bound.  A presigned URL signs the method, host and path only, so the
``Range`` header may vary.  Not botocore per range: its request building, signing and
response parsing cost several times the CPU of the aiohttp request itself, which on a
small machine competes with decoding.  Not s3fs's ``cat_ranges`` either: s3fs retries
five times with pauses up to 15 s and botocore again beneath it, so a dead endpoint
would stall an epoch for minutes.

Sizes come from ``HeadObject`` through botocore (a presigned GET cannot be used for a
HEAD), once per object and process, with botocore's own retries off and its timeouts set
to the request timeout (formats/storage.py ``fs_options``); the attempts are counted
here as for HTTP.

Errors name ``s3://bucket/key`` (never the presigned URL): ``NoSuchKey`` /
``NoSuchBucket`` (404) are :class:`ShardMissing` at once; refused credentials (403:
``SignatureDoesNotMatch``, ``InvalidAccessKeyId``, ``AccessDenied``) :class:`AccessDenied`;
5xx / ``SlowDown`` / 429, refused or broken connections and timeouts are retried with
backoff, then :class:`RemoteUnreachable` names the object and the byte range.
"""
from __future__ import annotations

import asyncio
import time

from ..formats.storage import pin
from .errors import AccessDenied, RemoteError, ShardMissing
from .remote import TRANSIENT_STATUS, HttpRanges, RetryPolicy, _reason, _span, _Transient

__all__ = ["S3Ranges", "split_s3"]

PRESIGN_SECONDS = 3600      # lifetime of a presigned URL
_RENEW_AFTER = PRESIGN_SECONDS / 2

_MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED = frozenset({"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId",
                     "InvalidToken", "ExpiredToken", "403"})
_BUSY = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                   "Throttling", "ThrottlingException"})
_CHECK = ("check the credentials (storage_options key/secret, or AWS_ACCESS_KEY_ID / "
          "AWS_SECRET_ACCESS_KEY) and the endpoint (endpoint_url / AWS_ENDPOINT_URL)")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ValueError(f"not an s3://bucket/key URL: {url!r}")
    return bucket, key


class S3Ranges(HttpRanges):
    """Ranged GETs of presigned ``GetObject`` URLs on fsspec's HTTP session, ``HeadObject``
    on the s3fs client ``s3fs``; retries, timeouts and bounds as :class:`HttpRanges`."""

    def __init__(self, s3fs, policy: RetryPolicy):
        import fsspec
        super().__init__(pin(fsspec.filesystem("http")), policy)
        self.s3fs = s3fs
        self._signed: dict[str, tuple[str, float]] = {}   # s3 URL -> (presigned, when)

    async def _target(self, url: str) -> str:
        got = self._signed.get(url)
        if got is None or time.monotonic() - got[1] > _RENEW_AFTER:
            bucket, key = split_s3(url)
            client = await self.s3fs.set_session()
            signed = await client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS)
            got = self._signed[url] = (signed, time.monotonic())
        return got[0]

    def _status(self, r, url: str, start: int | None, end: int | None) -> Exception:
        if r.status == 403:
            return AccessDenied(f"access denied to {url}{_span(start, end)}: the server "
                                f"answered 403 {r.reason}; {_CHECK}")
        return super()._status(r, url, start, end)

    def _client_error(self, e, url: str) -> Exception:
        """The error for an S3 error answer to a HeadObject (a botocore ``ClientError``)."""
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        what = f"{status} {code}: {err.get('Message', '')}".strip()
        if code in _MISSING or status in (404, 410):
            return ShardMissing(f"shard {url} is missing: the server answered {what}")
        if code in _DENIED or status == 403:
            return AccessDenied(f"access denied to {url}: the server answered {what}; {_CHECK}")
        if code in _BUSY or status in TRANSIENT_STATUS:
            return _Transient(f"S3 {what}")
        return RemoteError(f"{url}: the server answered {what}")

    async def _head(self, session, url: str, *_) -> int | None:
        from botocore.exceptions import ClientError
        bucket, key = split_s3(url)
        client = await self.s3fs.set_session()
        try:
            r = await client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            raise self._client_error(e, url) from e
        return int(r["ContentLength"])

    def _transient(self, e: BaseException) -> str | None:
        from botocore.exceptions import ConnectionError as BotoConnection, HTTPClientError
        if isinstance(e, (BotoConnection, HTTPClientError)):
            if "Timeout" in type(e).__name__:  # ReadTimeoutError, ConnectTimeoutError
                return _reason(asyncio.TimeoutError(), float(self.policy.timeout))
            cause = getattr(e, "kwargs", {}).get("error")  # the aiohttp / socket error
            if isinstance(cause, BaseException):
                return _reason(cause, float(self.policy.timeout))
            return f"{type(e).__name__}: {e}"
        return super()._transient(e)
