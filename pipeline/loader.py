"""``Loader``: what a training loop iterates.

Per epoch ``e`` (see docs/architecture.md, "Loader"):
  1. ``scores.sync()`` once, then the planner computes the epoch plan from
     ``(seed, e, committed scores)``; the plan digest is compared across ranks;
  2. this rank's planned ids are cut into batches (the last one padded with id -1 and
     weight 0, or dropped with ``drop_last``) and published as a table on disk;
  3. the backend (DALI or torch) reads only those samples' byte ranges, decodes and
     augments them; the loader adds weights, applies probabilistic mixup on the batch's
     device and yields :class:`Batch` objects;
  4. ``update(ids, losses)`` buffers per-sample losses for the next ``sync``.

Evaluation uses the same machinery with ``train=False`` (or :meth:`Loader.for_eval`):
no pruning, deterministic transforms, every sample exactly once in shard order, the last
partial batch padded (padding rows have ``ids == -1`` and ``weights == 0``).
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .augment import get_augment
from .mixup import MixInfo, apply_mixup, draw_mixup, mixup_cross_entropy, score_update
from .reader import (FLAG_CORRUPT, FLAG_PAD, PlannedSource, RangeReader, cancel_table,
                     file_order_rank, is_url, publish_table)
from .stats import EpochStats

STATE_VERSION = 1


class CorruptSampleError(RuntimeError):
    """A sample's bytes fail their checksum or cannot be decoded (``on_corrupt="raise"``)."""


@dataclass
class Batch:
    """One training step's data.

    ``images`` float NCHW on the loader's device; ``labels`` int64 (0 on padding rows);
    ``ids`` int64 sample ids (-1 = padding or a skipped corrupt sample); ``weights``
    float32 loss weights (0 on padding); ``mix`` who was mixed with whom (or None).
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    mix: MixInfo | None
    epoch: int
    step: int

    @property
    def mask(self) -> torch.Tensor:
        """True on real samples."""
        return self.ids >= 0

    def loss(self, logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-sample, mixup-aware cross-entropy (0 on padding rows).

        Also remembers, for :meth:`Loader.update`, what the score update of
        docs/algorithm.md needs: each row's primary CE and its weight ``lambda``.
        """
        ce = mixup_cross_entropy(logits, self.labels, self.mix, label_smoothing)
        out = torch.where(self.mask.to(ce.device), ce, torch.zeros_like(ce))
        if self.mix is not None:
            self._score = (out.data_ptr(),) + score_update(logits, self.labels, self.mix,
                                                           label_smoothing)
        return out

    def score_update(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses, weights) to feed the scores for this batch (docs/algorithm.md).

        ``losses`` returned by :meth:`loss` (or a detached view of it) are replaced by the
        primaries' own CE; any other per-sample losses are used as given.  Mixed rows get
        weight ``lambda``, others 1.
        """
        sc = getattr(self, "_score", None)
        if sc is not None and torch.is_tensor(losses) and losses.data_ptr() == sc[0]:
            return sc[1], sc[2]
        if self.mix is None:
            return losses, torch.ones(len(self), dtype=torch.float32)
        return losses, self.mix.lam

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _dist_defaults(world_size, rank):
    if world_size is None or rank is None:
        try:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                world_size = dist.get_world_size() if world_size is None else world_size
                rank = dist.get_rank() if rank is None else rank
        except Exception:
            pass
    return int(world_size or 1), int(rank or 0)


def _filler(codec: str, sample_shape, channels: int) -> np.ndarray:
    """A valid sample used for padding rows and skipped corrupt samples (never read from disk)."""
    shape = tuple(sample_shape) if sample_shape else (8, 8, channels)
    if codec in ("raw", "npy"):
        return np.zeros(shape, dtype=np.uint8)
    from PIL import Image
    mode = "L" if channels == 1 else "RGB"
    buf = io.BytesIO()
    Image.new(mode, (shape[1], shape[0])).save(buf, "PNG" if codec == "png" else "JPEG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _decodable(data: bytes, codec: str) -> bool:
    """True when PIL can decode an encoded sample (used to find what killed a DALI pipeline)."""
    if codec in ("raw", "npy"):
        return True
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class Loader:
    """Streaming loader that reads, decodes and augments only the planned samples.

    Args:
        ds: a :class:`pipeline.manifest.Dataset` (``pipeline.open_dataset``).
        batch_size: samples per batch on this rank.
        keep, policy, epochs, seed, policy_kwargs, window: planning (see docs/algorithm.md).
        backend: ``"dali"`` or ``"torch"``.  device: ``"cuda"``/``"cuda:N"``/``"cpu"``
            (default: cuda when available).
        augment: ``"cifar"``, ``"imagenet"`` or None.  image_size: output size override.
        mixup: probabilistic mixup with the plan's per-sample probabilities;
            mixup_alpha: Beta(alpha, alpha) for lambda.
        world_size, rank: default from torch.distributed when initialized.
        num_workers: reader processes (DALI ``py_num_workers`` / DataLoader workers); 0
            reads in the main process (DALI: a plain, non-parallel ``external_source``).
            Default: 0 for the DALI backend on a CPU-only device reading local files (no
            inter-process hand-off: measured fastest on 2 cores, docs/benchmarks.md),
            else 2 (keeps I/O latency and reading off the training thread).
        drop_last: drop the last partial batch instead of padding it (training only).
        on_corrupt: ``"skip"`` (warn, count, deliver as padding) or ``"raise"``.
        merge_gap: reader merge setting (bytes or ``"neighbors"``; default per storage).
        train: False = evaluation (no pruning, no random augmentation, every sample once).
        verify_crc: check each payload against the manifest's CRC32 when read.
        verify_files: ``"size"`` (default), ``"checksum"`` or None: what to check of every
            shard when the loader is created.
        scores: an existing :class:`pipeline.Scores` (default: a new one).
        direct_io: local shards read with O_DIRECT (whole logical blocks, no page cache):
            for samples smaller than a page it keeps pruned neighbours off the disk, at
            the price of re-reading from the device every epoch.
    """

    def __init__(self, ds, batch_size: int, keep: float = 1.0, policy: str = "swdpp",
                 epochs: int = 1, seed: int = 0, backend: str = "dali", device: str | None = None,
                 augment: str | None = "cifar", mixup: bool = False, mixup_alpha: float = 1.0,
                 world_size: int | None = None, rank: int | None = None, num_workers: int | None = None,
                 policy_kwargs: dict | None = None, window: int = 4, drop_last: bool = False,
                 on_corrupt: str = "skip", merge_gap: int | str | None = None, train: bool = True,
                 verify_crc: bool = True, verify_files: str | None = "size",
                 image_size: int | None = None, prefetch: int = 2, num_threads: int | None = None,
                 scores=None, storage_options: dict | None = None, workdir: str | None = None,
                 py_start_method: str = "fork", direct_io: bool = False):
        if backend not in ("dali", "torch"):
            raise ValueError(f"backend must be 'dali' or 'torch', not {backend!r}")
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', not {on_corrupt!r}")
        self.ds = ds
        self.n = len(ds)
        self.batch_size = int(batch_size)
        self.keep, self.policy_name, self.epochs, self.seed = keep, policy, epochs, int(seed)
        self.backend = backend
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.train = bool(train)
        self.mixup = bool(mixup) and self.train
        self.mixup_alpha = float(mixup_alpha)
        self.world_size, self.rank = _dist_defaults(world_size, rank)
        if num_workers is None:
            local = not (ds.files and is_url(ds.files[0]))
            num_workers = 0 if (backend == "dali" and not self.gpu and local) else 2
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last) and self.train
        self.on_corrupt = on_corrupt
        self.prefetch = int(prefetch)
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self.py_start_method = py_start_method
        self.codec = ds.codec
        self.channels = int(getattr(ds, "channels", 3) or 3)
        self.spec = get_augment(augment, self.train, self.channels, ds.sample_shape, image_size)

        # workdir: published tables and the bad-sample mask (shared with worker processes)
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="swdpp-loader-")
        os.makedirs(self.workdir, exist_ok=True)
        self._bad_path = os.path.join(self.workdir, "bad.npy")
        np.save(self._bad_path, np.zeros(self.n, dtype=np.uint8))
        self._bad = np.load(self._bad_path, mmap_mode="r+")
        if self._own_workdir:
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.workdir, True)

        if verify_files:
            ds.check_files(verify_checksum=(verify_files == "checksum"))
        self._rank_in_file = file_order_rank(ds.file, ds.offset)
        reader = RangeReader(ds.files, getattr(ds, "file_sizes", None), merge_gap=merge_gap,
                             rank=self._rank_in_file, storage_options=storage_options,
                             direct_io=direct_io)
        self.merge_gap = reader.merge_gap
        self.source = PlannedSource(ds, self.workdir, reader, self.spec,
                                    _filler(self.codec, ds.sample_shape, self.channels),
                                    self.codec, ds.sample_shape, verify_crc=verify_crc)

        # planning
        if self.train:
            from .planner import EpochPlanner
            from .policies import get_policy
            from .scores import Scores
            self.policy = get_policy(policy, keep=keep, epochs=epochs, **(policy_kwargs or {}))
            self.scores = scores if scores is not None else Scores(self.n)
            self.planner = EpochPlanner(self.policy, self.scores, ds.file, ds.offset, self.seed,
                                        world_size=self.world_size, window=window, pad=True)
        else:
            self.policy = self.planner = None
            self.scores = scores
        self._synced_epoch: int | None = None
        self._plan_cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._resume: tuple[int, int] | None = None
        self._position = (0, 0)  # (epoch, batches consumed) for state_dict
        self._stats: dict[int, EpochStats] = {}
        self._warned: set[int] = set()
        self._last_batch: Batch | None = None

        # DALI: define the pipeline and fork its workers now, before anything touches CUDA
        self._pipe = None
        self._dali_k = 0
        if self.backend == "dali":
            self._pipe = self._new_pipeline()
            self._built = False

    # -- construction helpers ------------------------------------------------------------
    @classmethod
    def for_eval(cls, ds, batch_size: int, augment: str | None = None, **kw) -> "Loader":
        """A loader that yields every sample exactly once, unaugmented, last batch padded."""
        kw.pop("keep", None); kw.pop("policy", None); kw.pop("mixup", None)
        return cls(ds, batch_size, keep=1.0, policy="full", augment=augment, mixup=False,
                   train=False, **kw)

    def _new_pipeline(self, start_method: str | None = None):
        from .dali_pipeline import build_pipeline
        method = start_method or self.py_start_method
        if method == "fork":
            try:
                from nvidia.dali import backend as _b
                if _b.IsDriverInitialized():
                    method = "spawn"  # CUDA already up in this process: fork is unsafe
            except Exception:
                pass
        device_id = self.device.index if self.device.index is not None else int(
            os.environ.get("LOCAL_RANK", 0))
        # pack encoded payloads into one [B, max_len] array when sizes are similar
        # (padding waste <= 2x); otherwise ship them as a list
        lengths = np.asarray(self.ds.length)
        max_len = int(lengths.max()) if len(lengths) else 0
        packed = max_len if max_len and max_len <= 2 * float(lengths.mean()) else None
        if packed:
            packed = max(packed, len(self.source.filler))  # padding rows carry the filler
        return build_pipeline(self.source, self.spec, self.batch_size, self.codec,
                              self.channels, self.gpu, device_id=device_id,
                              num_threads=self.num_threads, py_num_workers=self.num_workers,
                              prefetch=self.prefetch, seed=self.seed, py_start_method=method,
                              packed_len=packed)

    # -- planning -------------------------------------------------------------------------
    def _rank_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (ids, weights, mixup) for ``epoch``; syncs scores once per epoch."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1:]
        if not self.train:
            order = np.lexsort((np.asarray(self.ds.offset), np.asarray(self.ds.file)))
            per = -(-self.n // self.world_size)
            ids = np.full(per, -1, dtype=np.int64)
            mine = order[self.rank * per:(self.rank + 1) * per]
            ids[:len(mine)] = mine
            w = (ids >= 0).astype(np.float32)
            mix = np.zeros(per, dtype=np.float32)
        else:
            if self._synced_epoch != epoch:
                self.scores.sync(epoch)
                self._synced_epoch = epoch
            plan = self.planner.plan(epoch)
            try:
                from .distributed import check_plan_digest
                check_plan_digest(plan)
            except ImportError:
                pass
            ids, w, mix = (np.asarray(a) for a in plan.rank(self.rank))
            ids = ids.astype(np.int64)
            w = np.where(ids >= 0, w, 0).astype(np.float32)
            mix = np.asarray(mix, dtype=np.float32)
        self._plan_cache = (epoch, ids, w, mix)
        return ids, w, mix

    def _batches(self, epoch: int):
        """(ids, weights, mixup) as [steps, batch_size] arrays, padded with -1 / 0."""
        ids, w, mix = self._rank_plan(epoch)
        b = self.batch_size
        steps = len(ids) // b if self.drop_last else -(-len(ids) // b)
        total = steps * b
        def fit(a, fill):
            out = np.full(total, fill, dtype=a.dtype)
            m = min(total, len(a))
            out[:m] = a[:m]
            return out.reshape(steps, b)
        return fit(ids, -1), fit(w, 0.0), fit(mix, 0.0)

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Batches this rank yields in ``epoch`` (known before the epoch starts)."""
        if self.train and self.planner is not None:
            return int(self.planner.steps_per_epoch(epoch, self.batch_size, self.drop_last))
        per = -(-self.n // self.world_size)
        return -(-per // self.batch_size)

    # -- iteration ------------------------------------------------------------------------
    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Iterate the batches of ``epoch`` (resuming mid-epoch after ``load_state_dict``)."""
        t_start = time.perf_counter()
        ids, w, mix = self._batches(epoch)
        steps = ids.shape[0]
        first = 0
        if self._resume is not None and self._resume[0] == epoch:
            first = min(self._resume[1], steps)
        self._resume = None
        st = EpochStats(epoch=epoch, rank=self.rank, world_size=self.world_size,
                        steps=steps - first, resumed_at_step=first,
                        samples_planned=int((ids[first:] >= 0).sum()),
                        dataset_samples=self.n,
                        dataset_payload=int(np.asarray(self.ds.length, dtype=np.int64).sum()),
                        dataset_file_bytes=int(np.asarray(getattr(self.ds, "file_sizes", [0])).sum()))
        self._stats[epoch] = st
        self._position = (epoch, first)
        if first >= steps:
            return
        table = ids[first:]
        if self.backend == "dali":
            gen = self._dali_batches(epoch, table, first, st)
        else:
            gen = self._torch_batches(epoch, table, first, st)
        step = first
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    images, meta = next(gen)
                except StopIteration:
                    break
                st.wait_s += time.perf_counter() - t0
                batch = self._make_batch(epoch, step, images, meta, ids[step], w[step], mix[step], st)
                step += 1
                self._position = (epoch, step)
                st.epoch_s = time.perf_counter() - t_start
                self._last_batch = batch
                yield batch
        finally:
            gen.close()
            st.epoch_s = time.perf_counter() - t_start
        if step != steps:
            raise RuntimeError(f"epoch {epoch}: backend delivered {step - first} of "
                               f"{steps - first} batches")

    def _account(self, meta: np.ndarray, st: EpochStats) -> None:
        io = meta[0, 3:8]
        st.samples_read += int(io[0]); st.bytes_read += int(io[1]); st.payload_read += int(io[2])
        st.requests += int(io[3]); st.read_s += float(io[4]) / 1e9

    def _make_batch(self, epoch, step, images, meta, ids, w, mix, st: EpochStats) -> Batch:
        self._account(meta, st)
        got = meta[:, 0]
        if not np.array_equal(got, ids):  # the backend must deliver exactly the planned batch
            raise RuntimeError(f"epoch {epoch} step {step}: backend delivered ids "
                               f"{got[:8].tolist()}..., planned {ids[:8].tolist()}...")
        flags = meta[:, 2]
        corrupt = (flags == FLAG_CORRUPT) & (ids >= 0)
        if corrupt.any():
            self._corrupt(ids[corrupt], st)
        ids = np.where(corrupt, -1, ids)
        valid = ids >= 0
        st.samples_delivered += int(valid.sum())
        st.samples_padding += int((flags == FLAG_PAD).sum())
        labels = np.where(valid, meta[:, 1], 0)
        dev = self.device
        images = images.to(dev, non_blocking=True)
        info = None
        if self.mixup and mix.any():
            partner, lam, mixed = draw_mixup(mix, valid, self.mixup_alpha, self.seed, epoch,
                                             self.rank, step)
            if mixed.any():
                info = MixInfo(torch.from_numpy(partner), torch.from_numpy(lam),
                               torch.from_numpy(mixed)).to(dev)
                images = apply_mixup(images, info)
        return Batch(images=images, labels=torch.from_numpy(labels.astype(np.int64)).to(dev),
                     ids=torch.from_numpy(ids.astype(np.int64)).to(dev),
                     weights=torch.from_numpy(np.where(valid, w, 0).astype(np.float32)).to(dev),
                     mix=info, epoch=epoch, step=step)

    def _corrupt(self, bad_ids: np.ndarray, st: EpochStats) -> None:
        for i in bad_ids.tolist():
            f = self.ds.files[int(self.ds.file[i])]
            msg = (f"corrupt sample {i} ({f} @ {int(self.ds.offset[i])}, "
                   f"{int(self.ds.length[i])} bytes): checksum mismatch or undecodable")
            if self.on_corrupt == "raise":
                raise CorruptSampleError(msg)
            if i not in self._warned:
                warnings.warn(msg + "; skipped", RuntimeWarning, stacklevel=3)
                self._warned.add(i)
            self._bad[i] = 1  # later epochs skip it without reading its bytes
        self._bad.flush()
        st.samples_corrupt += len(bad_ids)
        st.corrupt_ids.extend(int(i) for i in bad_ids)

    # -- backends -------------------------------------------------------------------------
    def _torch_batches(self, epoch, table, first, st):
        from .torch_backend import iterate
        # a fresh table name per epoch: no process may hold a stale mapping of an old one
        k = self._torch_k = getattr(self, "_torch_k", -1) + 1
        path = self.source.table_path(k)
        publish_table(path, table, epoch, first, self.rank, self.seed)
        try:
            for images, meta, decode_ns in iterate(self.source, k, self.spec, self.codec,
                                                   self.channels, self.num_workers,
                                                   self.prefetch):
                st.decode_s += decode_ns / 1e9
                yield images, meta
        finally:
            _remove(path)  # the DataLoader's workers are gone: the table is not needed

    def _dali_batches(self, epoch, table, first, st):
        """Run the DALI pipeline over ``table``; recover from a sample that kills the decoder."""
        from .dali_pipeline import outputs_to_torch
        done = 0  # batches of ``table`` delivered
        while done < len(table):
            k = self._dali_k
            path = self.source.table_path(k)
            publish_table(path, table[done:], epoch, first + done, self.rank, self.seed)
            if not self._built:
                self._pipe.build()
                self._built = True
            finished = False
            try:
                while True:
                    try:
                        outs = self._pipe.run()
                    except StopIteration:
                        finished = True
                        break
                    images, meta = outputs_to_torch(outs, self.device)
                    done += 1
                    yield images, meta
            except GeneratorExit:
                self._abandon(path, st)
                raise
            except Exception as e:  # noqa: BLE001 - DALI raises plain RuntimeErrors
                if "StopIteration" in type(e).__name__:
                    raise
                self._recover(e, table[done:done + self.prefetch + 2], st)
                continue
            finally:
                if finished:
                    self._pipe.reset()
                    self._dali_k += 1
                    _remove(path)  # no worker reads a finished DALI epoch's table again
            if finished and done < len(table):
                raise RuntimeError(f"DALI epoch ended after {done} of {len(table)} batches")

    def _abandon(self, path: str, st: EpochStats) -> None:
        """End a DALI epoch the caller left early: stop the workers, drain what is in flight."""
        try:
            cancel_table(path, 0)
            while True:
                try:
                    _, meta = self._pipe.run()
                except StopIteration:
                    break
                self._account(np.array(meta.as_array()), st)  # read, though not delivered
            self._pipe.reset()
            self._dali_k += 1
            _remove(path)
        except Exception:  # a broken pipeline: rebuild on next use
            self._replace_pipeline()

    def _replace_pipeline(self) -> None:
        from .dali_pipeline import close_pipeline
        old, self._pipe = self._pipe, None
        close_pipeline(old)
        self._pipe = self._new_pipeline()
        self._built = False
        self._dali_k = 0

    def _recover(self, err: Exception, candidates: np.ndarray, st: EpochStats) -> None:
        """The DALI pipeline died (e.g. an undecodable image): find the culprit, mask it,
        rebuild the pipeline and carry on from the first undelivered batch."""
        ids = candidates[candidates >= 0]
        ids = ids[self._bad[ids] == 0]
        probe = RangeReader(self.ds.files, getattr(self.ds, "file_sizes", None), merge_gap=0)
        bufs = probe.read(self.ds.file[ids], self.ds.offset[ids], self.ds.length[ids])
        bad = np.array([i for i, b in zip(ids.tolist(), bufs) if not _decodable(bytes(b), self.codec)],
                       dtype=np.int64)
        if len(bad) == 0:
            raise err
        # re-delivering these batches reports the culprits as corrupt (flag from the mask)
        for i in bad.tolist():
            self._bad[i] = 1
        self._bad.flush()
        st.read_s += probe.counters.seconds
        warnings.warn(f"DALI pipeline failed ({str(err).splitlines()[0][:200]}); "
                      f"masked undecodable samples {bad.tolist()} and rebuilt the pipeline",
                      RuntimeWarning, stacklevel=2)
        self._replace_pipeline()

    # -- scores, stats, state --------------------------------------------------------------
    def update(self, ids, losses, weights=None) -> None:
        """Buffer per-sample losses for the next epoch's plan (rows with id -1 are ignored).

        For the batch just yielded, mixed rows follow docs/algorithm.md ("Mixup and score
        updates"): only the primary is updated, with its own CE (when ``losses`` come from
        ``batch.loss``) and weight ``lambda``.
        """
        if self.scores is None:
            return
        last = self._last_batch
        if (weights is None and last is not None and last.mix is not None
                and torch.is_tensor(ids) and ids.data_ptr() == last.ids.data_ptr()):
            losses, weights = last.score_update(losses)
        if torch.is_tensor(ids):
            ids = ids.detach()
        if torch.is_tensor(losses):
            losses = losses.detach()
        if torch.is_tensor(weights):
            weights = weights.detach()
        self.scores.update(ids, losses, weights)

    def stats(self, epoch: int | None = None) -> EpochStats:
        """Counters of ``epoch`` (default: the latest epoch started)."""
        if epoch is None:
            epoch = max(self._stats) if self._stats else 0
        return self._stats[epoch]

    def state_dict(self) -> dict:
        """Position and scores (torch tensors / python scalars: ``torch.load(weights_only=True)``)."""
        epoch, step = self._position
        return {
            "version": STATE_VERSION, "epoch": int(epoch), "step": int(step),
            "seed": self.seed, "world_size": self.world_size, "rank": self.rank,
            "synced_epoch": -1 if self._synced_epoch is None else int(self._synced_epoch),
            "scores": None if self.scores is None else self.scores.state_dict(),
            "bad": torch.from_numpy(np.flatnonzero(np.asarray(self._bad)).astype(np.int64)),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore; the next ``epoch(sd["epoch"])`` skips the batches already consumed."""
        if int(sd.get("version", -1)) != STATE_VERSION:
            raise ValueError(f"unsupported Loader state version {sd.get('version')!r}")
        if int(sd["seed"]) != self.seed or int(sd["world_size"]) != self.world_size:
            raise ValueError("state was saved with a different seed or world size")
        if sd.get("scores") is not None and self.scores is not None:
            self.scores.load_state_dict(sd["scores"])
        synced = int(sd["synced_epoch"])
        self._synced_epoch = None if synced < 0 else synced
        self._plan_cache = None
        bad = np.asarray(sd.get("bad", np.zeros(0)), dtype=np.int64)
        self._bad[:] = 0
        self._bad[bad] = 1
        self._bad.flush()
        self._resume = (int(sd["epoch"]), int(sd["step"]))
        self._position = self._resume

    def close(self) -> None:
        """Stop worker processes and remove the loader's temporary files."""
        if self._pipe is not None:
            from .dali_pipeline import close_pipeline
            old, self._pipe = self._pipe, None
            close_pipeline(old)
        if self._own_workdir:
            self._cleanup()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Loader(n={self.n}, batch_size={self.batch_size}, backend={self.backend!r}, "
                f"device={str(self.device)!r}, train={self.train}, policy={self.policy_name!r}, "
                f"keep={self.keep}, rank={self.rank}/{self.world_size})")
