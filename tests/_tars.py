"""Hand-made tar shards for the tests: exact member names, order and bytes."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path


def pax_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Write ``members`` (name, data), in that order, as a POSIX (PAX) tar at ``path``."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def shard_writer(directory: Path, samples, maxcount: int = 40) -> None:
    """Write ``samples`` (dicts with ``__key__`` and member bytes/str) into
    ``directory/part-NNNNNN.tar`` with the ``webdataset`` library's own ShardWriter."""
    import webdataset as wds
    with wds.ShardWriter(str(directory / "part-%06d.tar"), maxcount=maxcount, verbose=0) as w:
        for s in samples:
            w.write(s)
