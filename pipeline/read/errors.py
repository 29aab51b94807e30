"""Storage errors of the read stage: each message names the shard (and, remote, the range).

They are kept apart from the reader so that the remote client (read/remote.py) and the
reader share them without importing each other.  A reader process's exception reaches
the main process as text when DALI's parallel workers carry it (its type is lost there),
so :func:`storage_error` rebuilds the typed error from that text: the backends then stop
the run with the storage error itself instead of treating it as an undecodable image.
"""
from __future__ import annotations

import re

__all__ = ["ShardError", "ShardMissing", "RemoteError", "RemoteUnreachable",
           "RangeNotSupported", "AccessDenied", "storage_error"]


class ShardError(IOError):
    """A shard is missing, truncated, replaced or fails its checksum; the message names it."""


class ShardMissing(ShardError):
    """The shard does not exist (a local file that is absent, or HTTP 404/410)."""


class RemoteError(ShardError):
    """A remote shard could not be read (a status the reader cannot use); names URL and range."""


class RemoteUnreachable(RemoteError):
    """The server did not answer (connection refused or reset, no byte within the request
    timeout, or 5xx) on every attempt: the data may exist, the server is the problem."""


class RangeNotSupported(RemoteError):
    """The server ignores ``Range`` (answers 200 with the whole file, or another range):
    the dataset cannot be read from it sample by sample."""


class AccessDenied(RemoteError):
    """The server refused the credentials (S3 403: wrong key or secret, no permission)."""


_TYPES = {c.__name__: c for c in (ShardError, ShardMissing, RemoteError, RemoteUnreachable,
                                  RangeNotSupported, AccessDenied)}
# "pipeline.read.errors.RemoteUnreachable: server unreachable ..." in a traceback's text
_LINE = re.compile(r"(?:^|[\s.])(" + "|".join(_TYPES) + r"): (.+)$", re.MULTILINE)


def storage_error(err: BaseException) -> ShardError | None:
    """``err`` if it is a storage error; the storage error whose traceback text ``err``
    carries (a reader process's exception re-raised by DALI); else None."""
    if isinstance(err, ShardError):
        return err
    found = _LINE.findall(str(err))
    if not found:
        return None
    name, message = found[-1]  # the innermost: the exception the reader raised
    return _TYPES[name](message.strip())
