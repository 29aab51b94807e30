"""The DALI backend: external_source(plan) -> decode -> augment, GPU ("mixed") or CPU-only.

One long-lived pipeline serves every epoch.  Its batch-mode ``external_source`` callback
(:class:`_Callback`) is stateless: given ``BatchInfo(iteration, epoch_idx)`` it opens the
table the backend published *before* that DALI epoch started (DALI's ``epoch_idx`` counts
pipeline resets, so the backend names its tables ``dali-<generation>-<epoch_idx>`` and
counts resets in step; a rebuilt pipeline is a new generation), reads that batch's
planned byte ranges and returns the encoded bytes, the ``META_DTYPE`` records (as int64
``[B, 4]``) and the augmentation parameters drawn in :mod:`pipeline.decode.augment`.  The
callback raises ``StopIteration`` at and past the table's limit (DALI prefetches past the
end), and every batch is full: padding rows carry the filler image.

With a GPU the images are decoded with ``device="mixed"`` and augmented on the GPU;
without one the same graph runs with CPU operators (``device_id=None``).  Reader processes
are forked by ``start_py_workers()`` when the backend is created, before ``build()``
creates a CUDA context.  A sample that kills the pipeline (bytes that pass their checksum
but do not decode) is found by decoding the suspects with PIL, masked as bad, and the
pipeline is rebuilt; the epoch carries on from the first undelivered batch.
"""
from __future__ import annotations

import atexit
import collections
import os
import warnings
import weakref
from dataclasses import replace
from typing import Iterator

import numpy as np

from ..formats.imagesize import batch_hw
from ..plan.distributed import dist_env
from ..read.errors import storage_error
from ..read.ranges import ReadCounters
from ..read.source import meta_from_array, meta_to_array
from ..read.table import TableHeader
from .augment import AugmentSpec, rrc_pixels, sample_params
from .backend import Backend, BackendConfig, RawBatch, decodable, uneven_sizes
from .procs import die_with_parent_default, init_reader_process, reader_processes, stop_pool

__all__ = ["DaliBackend"]

FIELD_PREFIX = "field."  # callback outputs carrying a requested extra member


class _Callback:
    """Batch-mode external_source callback: stateless, picklable (spawn) and fork-safe.

    ``fields`` names its outputs in order (a subset of payload, meta, anchor, shape, flip,
    length, then ``field.<name>`` for each requested extra member: its bytes, which the
    graph hands back untouched as CPU outputs).  Whatever has a fixed shape goes as one array with a batch dimension: DALI
    ships it through shared memory as one buffer, while a list costs per-sample Python
    work in the main process.  With ``packed_len`` the payloads are read in place into one
    ``[B, packed_len]`` array, handed on whole (``length`` lets the GPU graph cut each row
    back; the CPU decoders ignore the zeros after the image's end marker) or, with
    ``rows``, as one view per sample of just its bytes (no cut in the graph).
    """

    def __init__(self, source, spec: AugmentSpec, prefix: str, fields: tuple[str, ...],
                 packed_len: int | None, stack: bool, ring: int = 1, keep: bool = False,
                 rows: bool = False):
        self.source, self.spec, self.prefix, self.fields = source, spec, prefix, fields
        self.packed_len, self.stack, self.rows = packed_len, stack, rows
        self.ring = ring  # packed buffers in rotation (see _build)
        self.keep = keep  # main-process source (no_copy): keep the last `ring` batches alive
        # the reader process set-up (procs.py) for spawned workers, where no fork hook runs
        self.parent = (os.getpid(), die_with_parent_default())

    def __call__(self, info):
        init_reader_process(*self.parent)  # once per process; a no-op in the main process
        table = self.source.table(f"{self.prefix}{info.epoch_idx}.npy")
        sb = self.source.batch(table, info.iteration, self.packed_len, ring=self.ring)
        payload = sb.payload
        if self.stack:
            payload = np.stack(payload)
        elif self.rows:  # views of the packed rows (contiguous), each cut to its bytes
            payload = [payload[j, :n] for j, n in enumerate(sb.meta["length"].tolist())]
        out = {"payload": payload, "meta": meta_to_array(sb.meta)}
        if "flip" in self.fields:
            h = table.header
            hw = batch_hw(sb.payload) if self.spec.mode == "rrc" else None
            p = sample_params(self.spec, len(sb.meta), h.seed, h.epoch, h.rank,
                              h.first_step + info.iteration, hw)
            if hw is not None:
                p.anchor, p.shape = _pixel_windows(p.anchor, p.shape, hw)
            out.update(anchor=p.anchor, shape=p.shape, flip=p.flip)
        if "length" in self.fields:
            out["length"] = sb.meta["length"].astype(np.float32).reshape(-1, 1)
        for name, values in sb.fields.items():  # ragged uint8 rows, passed through the graph
            out[FIELD_PREFIX + name] = [np.frombuffer(v, dtype=np.uint8) for v in values]
        res = tuple(out[f] for f in self.fields)
        if self.keep:  # DALI reads these arrays in place: alive and unchanged until consumed
            recent = self.__dict__.setdefault("_recent", collections.deque(maxlen=self.ring))
            recent.append(res)
        return res


def _augment_graph(images, anchor, shape, flip, spec: AugmentSpec, cropped: bool = False):
    """Apply ``spec`` to decoded HWC uint8 images (DataNodes on CPU or GPU); ``cropped``:
    the decoder already cut the random-resized-crop window (ROI decode).  For "rrc" the
    window is in pixels (:func:`_pixel_windows`)."""
    from nvidia.dali import fn, types

    if spec.mode == "pad_crop":
        if shape is None:  # the fixed output window
            shape = np.asarray(spec.out_size, dtype=np.float32)
        if spec.resize_shorter:  # another size: to the output size first, as eval does
            images = fn.crop(fn.resize(images, resize_shorter=spec.resize_shorter, antialias=True),
                             crop=list(spec.out_size))
        images = fn.slice(images, anchor, shape, axes=[0, 1], normalized_anchor=False,
                          normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
    elif spec.mode == "rrc":
        if not cropped:
            images = fn.slice(images, anchor, shape, axes=[0, 1], normalized_anchor=False,
                              normalized_shape=False)
        images = fn.resize(images, size=list(spec.out_size), antialias=True)
    elif spec.mode == "resize_center":
        images = fn.resize(images, resize_shorter=spec.resize_shorter, antialias=True)
    kw = {}
    if spec.mode == "resize_center" and spec.out_size:
        kw["crop"] = list(spec.out_size)
    if spec.flip:
        kw["mirror"] = flip
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=list(spec.mean), std=list(spec.std), **kw)


def _pixel_windows(anchor: np.ndarray, shape: np.ndarray, hw: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The planned relative crop windows -> whole pixels inside each image, at least 1x1
    (:func:`augment.rrc_pixels`, the torch backend's formula, in float32 as there),
    float32 ``[B, 2]`` each.

    Computed here, in the callback, from the sizes read from the headers (``hw``,
    :func:`formats.imagesize.batch_hw`) rather than in the graph (``peek_image_shape`` and
    a chain of arithmetic operators per sample).  An image whose header neither our parser
    nor PIL reads counts as not decodable (``backend.decodable``): it gets a 1x1 window at
    the corner, which any image has, and if its decoding fails the usual bad-sample path
    takes over."""
    hw = hw.astype(np.float32)
    a, s = rrc_pixels(anchor, shape, hw)
    unknown = ~(hw > 0).all(axis=1)
    a[unknown], s[unknown] = 0.0, 1.0
    return a.astype(np.float32), s.astype(np.float32)


def _output_fields(spec: AugmentSpec, trim: bool, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The callback's outputs for ``spec``: a pad-crop window has a fixed shape (not sent);
    a random-resized crop's varies per sample; then the requested extra members."""
    fields = ["payload", "meta"]
    if spec.mode in ("pad_crop", "rrc") or spec.flip:
        fields += ["anchor", "flip"] if spec.mode == "pad_crop" else ["anchor", "shape", "flip"]
    if trim:
        fields.append("length")
    return tuple(fields) + tuple(FIELD_PREFIX + name for name in extra)


def _build(cfg: BackendConfig, prefix: str, start_method: str, device_id: int):
    """Define the pipeline and start its Python workers (not yet built: no CUDA yet)."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    gpu = cfg.device.type == "cuda"
    codec, spec = cfg.source.codec, cfg.spec
    stack = codec == "raw"  # fixed-shape pixels
    packed_len = cfg.source.packed_len()
    rows = bool(packed_len) and cfg.payload == "rows"  # else packed (DecodeOptions.payload)
    fields = _output_fields(spec, trim=bool(packed_len) and gpu and not rows,
                            extra=cfg.source.fields)
    dtype_of = {"payload": types.UINT8, "meta": types.INT64, "anchor": types.FLOAT,
                "shape": types.FLOAT, "flip": types.INT32, "length": types.FLOAT}
    dtype_of.update({FIELD_PREFIX + name: types.UINT8 for name in cfg.source.fields})
    workers = cfg.num_workers
    # The callback's packed batches rotate through a ring of buffers (read/source.py)
    # instead of a fresh allocation each.  A buffer is reused only when DALI is done with
    # it: in the main process DALI decodes the arrays in place (no_copy: no copy of every
    # batch's bytes into its own buffers) and may hold them until `prefetch` iterations
    # after the call; a reader process hands its results to a thread that copies them into
    # shared memory later, with at most `prefetch` batches of the source in flight (one
    # shared-memory chunk each).  So `prefetch` + 3 buffers, and in the main process the
    # callback keeps as many recent batches alive.
    ring = cfg.prefetch + 3
    pipe = Pipeline(batch_size=cfg.batch_size, num_threads=cfg.num_threads,
                    device_id=device_id if gpu else None, seed=cfg.seed,
                    py_num_workers=max(1, workers), py_start_method=start_method,
                    prefetch_queue_depth=cfg.prefetch, exec_dynamic=True)
    with pipe:
        outs = fn.external_source(
            source=_Callback(cfg.source, spec, prefix, fields, packed_len, stack, ring,
                             keep=workers == 0, rows=rows),
            num_outputs=len(fields), batch=True, batch_info=True, parallel=workers > 0,
            no_copy=True,
            **({"prefetch_queue_depth": cfg.prefetch} if workers > 0 else {}),
            dtype=[dtype_of[f] for f in fields])
        node = dict(zip(fields, outs))
        payload = node["payload"]
        if "length" in node:  # cut each packed row back to its payload (GPU decoder input)
            payload = fn.slice(payload, np.zeros(1, np.float32), node["length"], axes=[0],
                               normalized_anchor=False, normalized_shape=False)
        cropped = spec.mode == "rrc" and codec not in ("raw", "npy")
        decode_kw = dict(device="mixed" if gpu else "cpu",
                         output_type=types.GRAY if cfg.channels == 1 else types.RGB)
        if codec in ("raw", "npy"):
            images = payload.gpu() if gpu else payload  # already pixels: no decoding
        elif cropped:  # ROI decode: only the planned crop window is decoded
            images = fn.decoders.image_slice(payload, node["anchor"], node["shape"], axes=[0, 1],
                                             normalized_anchor=False, normalized_shape=False,
                                             **decode_kw)
        else:
            images = fn.decoders.image(payload, **decode_kw)
        images = _augment_graph(images, node.get("anchor"), node.get("shape"), node.get("flip"),
                                spec, cropped)
        pipe.set_outputs(images, node["meta"], *(node[FIELD_PREFIX + f] for f in cfg.source.fields))
    if workers > 0:
        with reader_processes():  # readers ignore stop signals and die with this process
            pipe.start_py_workers()
    return pipe


def _to_torch(images, device):
    """A DALI TensorList of float CHW images -> a torch tensor on ``device``, without a copy.

    The pipeline runs DALI's dynamic executor, whose output buffers stay valid for as long
    as anything references them and are never handed to a later iteration meanwhile (what
    DALI's own PyTorch iterator relies on), so torch takes the memory through DLPack: a
    batch kept by the caller never changes, and no batch-sized copy or allocation is made
    here (tens of MB a batch for photographs).  A CPU pipeline's output for a CUDA device
    is copied there."""
    import torch

    if not images.is_dense_tensor():
        err = uneven_sizes([tuple(images[i].shape()) for i in range(len(images))])
        if err is not None:
            raise err
    t = torch.from_dlpack(images.as_tensor())
    return t if t.device == torch.device(device) else t.to(device, non_blocking=True)


def _field_bytes(names: tuple[str, ...], outputs) -> dict[str, list[bytes]]:
    """The pipeline's field outputs (CPU TensorLists of uint8 rows) -> bytes per row."""
    return {name: [tl.at(i).tobytes() for i in range(len(tl))] for name, tl in zip(names, outputs)}


def _shutdown(pipe) -> None:
    """Shut a pipeline down and stop its Python workers now (not whenever it is collected:
    a pipeline killed by an error can stay referenced and its workers would linger).

    DALI's own ``WorkerPool.close`` can wait forever (on a worker that ignores SIGTERM, or
    on a queue whose lock a dead worker held), so it runs under :func:`procs.stop_pool`:
    bounded, then SIGKILL.  A close that stays stuck is detached from the pool so that
    DALI's finalizer, which calls it again at exit, returns at once."""
    if pipe is None:
        return
    pool = getattr(pipe, "_py_pool", None)
    try:
        pipe._shutdown()
    finally:
        if pool is not None and not stop_pool(pool.close, pool.pids()):
            inner = getattr(pool, "pool", None)
            if getattr(inner, "_observer", None) is not None:
                inner._observer = None


class DaliBackend(Backend):
    """One DALI pipeline per loader; see the module docstring."""

    name = "dali"

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self._generation = 0
        self._pipe = None
        self._closer = lambda: None  # replaced by each pipeline's finalizer
        self._new_pipeline()

    def _prefix(self) -> str:
        return os.path.join(self.config.workdir, f"dali-{self._generation}-")

    def _new_pipeline(self) -> None:
        cfg = self.config
        method = cfg.py_start_method
        if method == "fork":
            try:
                from nvidia.dali import backend as _b
                if _b.IsDriverInitialized():
                    method = "spawn"  # CUDA already up in this process: fork is unsafe
            except Exception:
                pass
        device_id = cfg.device.index if cfg.device.index is not None else dist_env().local_rank
        self._generation += 1
        self._epochs = 0       # DALI epochs (resets) of this pipeline: its epoch_idx
        self._built = False
        self._pipe = _build(cfg, self._prefix(), method, device_id)
        # stops the workers even when close() is never called (a script that just exits);
        # newer than DALI's own finalizer of the pool, so it runs first at exit.  Also an
        # atexit hook of its own: weakref's exit hook runs after multiprocessing's (which
        # joins the workers, waiting forever on DALI's) wherever some finalizer was made
        # before multiprocessing was imported; atexit runs the newest hook first
        self._closer = weakref.finalize(self, _shutdown, self._pipe)
        atexit.register(self._closer)

    def _close_pipeline(self) -> None:
        atexit.unregister(self._closer)
        self._closer()

    def _replace_pipeline(self) -> None:
        self._pipe = None
        self._close_pipeline()
        self._new_pipeline()

    def start(self, ids: np.ndarray, header: TableHeader) -> Iterator[RawBatch]:
        done = 0            # rows of ``ids`` delivered
        carry = ReadCounters()  # reads of a failed attempt, counted with the next batch
        while done < len(ids):
            table = self._publish(ids[done:], replace(header, first_step=header.first_step + done),
                                  f"dali-{self._generation}-{self._epochs}")
            if not self._built:
                self._pipe.build()
                self._built = True
            try:
                while True:
                    try:
                        images, meta, *extra = self._pipe.run()
                    except StopIteration:
                        break
                    reads = table.reads(self._delivered, self._delivered + 1)
                    reads += carry
                    carry = ReadCounters()
                    self._delivered += 1
                    done += 1
                    yield RawBatch(_to_torch(images, self.config.device),
                                   meta_from_array(meta.as_array()), reads,
                                   fields=_field_bytes(self.config.source.fields, extra))
            except GeneratorExit:
                self.abandon()
                raise
            except Exception as e:  # noqa: BLE001 - DALI raises plain RuntimeErrors
                carry += self._recover(e, ids[done:done + self.config.prefetch + 2])
                continue
            self._pipe.reset()
            self._epochs += 1
            self._finish()
            if done < len(ids):
                raise RuntimeError(f"DALI epoch ended after {done} of {len(ids)} batches")

    def abandon(self) -> ReadCounters:
        if self._active is None:
            return ReadCounters()
        try:
            self._active.cancel(0)
            while True:  # drain what the workers already produced
                try:
                    self._pipe.run()
                except StopIteration:
                    break
            self._pipe.reset()
            self._epochs += 1
        except Exception:  # a broken pipeline: rebuild it for the next epoch
            self._replace_pipeline()
        return self._finish()

    def _recover(self, err: Exception, candidates: np.ndarray) -> ReadCounters:
        """The pipeline died (e.g. an undecodable image): find the culprit among the next
        batches, mask it, rebuild the pipeline; re-delivering those batches reports the
        culprits as corrupt.  Returns what the dead attempt and the probe read.  A storage
        error (a reader's ShardError, typed again from a worker's traceback text) stops
        the run as it is: re-reading from a failing server would only wait longer."""
        storage = storage_error(err)
        if storage is not None:
            # a new pipeline for a later epoch (the dead one's readers may still wait on the
            # server), and no active table: abandon() must not drain batches bound to fail
            self._replace_pipeline()
            self._finish()
            raise storage from (None if storage is err else err)
        src = self.config.source
        ids = candidates[candidates >= 0]
        ids = ids[np.asarray(src.bad.mask[ids]) == 0]
        bufs, seconds = src.read_samples(ids)
        bad = [i for i, b in zip(ids.tolist(), bufs) if not decodable(b, src.codec)]
        if not bad:
            raise err
        src.bad.mark(bad)
        warnings.warn(f"DALI pipeline failed ({str(err).splitlines()[0][:200]}); masked "
                      f"undecodable samples {bad} and rebuilt the pipeline",
                      RuntimeWarning, stacklevel=3)
        reads = self._finish()
        reads.seconds += seconds
        self._replace_pipeline()
        return reads

    def close(self) -> None:
        self.abandon()
        self._pipe = None
        self._close_pipeline()
