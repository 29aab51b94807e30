"""``Loader``: what a training loop iterates: plan -> backend -> mixup -> Batch -> stats.

Per epoch ``e`` (docs/architecture.md, "One epoch"):
  1. ``scores.sync()`` once, then the planner computes the epoch plan from
     ``(seed, e, committed scores)``; the plan digest is compared across ranks;
  2. this rank's planned ids are cut into batches (:func:`pipeline.batch.cut_batches`);
  3. the backend (``pipeline.decode.BACKENDS``) publishes them, reads only those samples'
     byte ranges, decodes and augments them;
  4. the loader checks each batch is the planned one, reports corrupt samples, applies
     probabilistic mixup on the batch's device and yields :class:`Batch` objects;
  5. ``update(ids, losses)`` buffers per-sample losses for the next ``sync``.

Evaluation (``Loader.for_eval``): no pruning, deterministic transforms, every sample
exactly once in byte order, the last partial batch padded (ids -1, weights 0).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
import weakref
from typing import Iterator

import numpy as np
import torch

from .batch import (Batch, BatchPlan, LastBatch, MixInfo, apply_mixup, blank_rows, cut_batches,
                    decode_fields, draw_mixup)
from .decode import BACKENDS
from .decode.augment import get_augment
from .decode.backend import BackendConfig, RawBatch
from .formats.storage import is_url
from .loader_state import LoaderState
from .options import LoaderOptions, OnCorrupt, default_parallelism
from .plan.distributed import check_plan_digest, dist_env
from .plan.planner import EpochPlanner, eval_plan, num_steps, remaining_plan
from .plan.policies import get_policy
from .plan.scores import Scores
from .read.corrupt import CorruptReport, CorruptSampleError
from .read.reader import RangeReader
from .read.remote import RetryPolicy
from .read.source import BadSamples, Flag, PlannedSource, make_filler
from .read.table import TableHeader
from .stats import EpochStats

__all__ = ["Loader", "CorruptSampleError"]



class Loader(LoaderState):
    """Streaming loader that reads, decodes and augments only the planned samples.

    Args:
        ds: a dataset from ``pipeline.open_dataset``.
        batch_size: samples per batch on this rank.
        keep, policy, epochs, seed: planning (docs/algorithm.md).
        backend: a name in ``pipeline.decode.BACKENDS`` ("dali", "torch").
        device: "cuda", "cuda:N" or "cpu" (default: cuda when available).
        augment: "cifar", "imagenet" or None.
        mixup: probabilistic mixup with the plan's per-sample probabilities (training).
        num_workers: reader processes (0: read in the main process).  Default: 0 for DALI
            on a CPU-only device reading local files, else 2, or 4 with a GPU and 8 cores
            or more per rank (:func:`pipeline.options.default_parallelism`).
        options: :class:`pipeline.options.LoaderOptions` for everything else.
    """

    def __init__(self, ds, batch_size: int, keep: float = 1.0, policy: str = "swdpp",
                 epochs: int = 1, seed: int = 0, backend: str = "dali", device: str | None = None,
                 augment: str | None = "cifar", mixup: bool = False, num_workers: int | None = None,
                 options: LoaderOptions | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, not {backend!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        opt = self.options = options or LoaderOptions()
        self.ds, self.n = ds, len(ds)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.keep, self.policy_name, self.epochs, self.backend = keep, policy, epochs, backend
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.train = opt.train
        self.mixup = bool(mixup) and self.train
        self.last_batch = opt.batch.last_batch if self.train else LastBatch.PAD
        env = dist_env()
        self.world_size = int(opt.plan.world_size if opt.plan.world_size is not None else env.world_size)
        self.rank = int(opt.plan.rank if opt.plan.rank is not None else env.rank)
        if not 0 <= self.rank < self.world_size:   # world_size may come from the environment
            raise ValueError(f"rank {self.rank} out of range for world_size {self.world_size}")
        workers, threads = default_parallelism(self.device.type, backend,
                                               local_files=not (ds.files and is_url(ds.files[0])))
        self.num_workers = int(workers if num_workers is None else num_workers)
        self.spec = get_augment(augment, self.train, int(ds.channels), ds.sample_shape,
                                opt.decode.image_size)

        # work directory: published tables and the bad-sample mask, shared with workers
        self._own_workdir = opt.read.workdir is None
        self.workdir = opt.read.workdir or tempfile.mkdtemp(prefix="swdpp-loader-")
        os.makedirs(self.workdir, exist_ok=True)
        if self._own_workdir:
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.workdir, True)
        self.bad = BadSamples(os.path.join(self.workdir, "bad.npy"), self.n)

        # remote storage options: the Loader's, else those open_dataset was given
        storage = opt.read.storage_options or getattr(ds, "storage_options", None)
        reader = RangeReader(ds.files, ds.file_sizes, merge_gap=opt.read.merge_gap,
                             rank=ds.file_rank, storage_options=storage,
                             direct_io=opt.read.direct_io,
                             retry=RetryPolicy(opt.read.request_timeout, opt.read.retries))
        if reader.remote:  # unreachable / missing / no Range support: one error, here
            reader.probe()
        if opt.read.verify_files:
            ds.check_files(verify_checksum=(opt.read.verify_files == "checksum"))
        self.merge_gap = reader.merge_gap
        self.field_kinds = dict(opt.read.fields)  # the source refuses fields the manifest lacks
        filler = make_filler(ds.codec, ds.sample_shape, int(ds.channels))
        self.source = PlannedSource(ds, reader, self.bad, filler,
                                    verify_crc=opt.read.verify_crc and ds.has_checksums,
                                    fields=tuple(self.field_kinds))

        self.scores = opt.plan.scores
        self.policy = self.planner = None
        if self.train:
            self._policy_kwargs = dict(opt.plan.policy_kwargs)
            self.policy = get_policy(policy, keep=keep, epochs=epochs, **self._policy_kwargs)
            if self.scores is None:
                self.scores = Scores(self.n)
            self.planner = EpochPlanner(self.policy, self.scores, ds.file, ds.offset, self.seed,
                                        world_size=self.world_size, window=opt.plan.window, pad=True,
                                        order=ds.byte_order)
            steps = self.planner.schedule(batch_size, True) if self.last_batch is LastBatch.DROP else [1]
            if 0 in steps:  # an epoch that trains on nothing, without a word: refuse it
                e, k = steps.index(0), self.policy.num_selected(self.n, steps.index(0))
                raise ValueError(f'last_batch="drop" with batch_size {batch_size} leaves epoch {e} '
                                 f"empty: it plans {k} of {self.n} samples, {-(-k // self.world_size)} "
                                 f'per rank; use a smaller batch_size or last_batch="pad"')
        self._synced_epoch: int | None = None
        self._plan: tuple[int, BatchPlan] | None = None
        self._resume: tuple[int, int] | None = None
        # (epoch, its earlier parts as (world size, steps)): an epoch resumed on another world size
        self._layout: tuple[int, tuple[tuple[int, int], ...]] = (-1, ())
        self._position = (0, 0)  # (epoch, batches consumed) for state_dict
        self._live: weakref.ref | None = None  # the epoch iterator streaming now
        self._planned: tuple[int, np.ndarray] | None = None  # (epoch, planned-id mask) for update()
        self._unplanned_warned = False
        self._stats: dict[int, EpochStats] = {}
        self._report = CorruptReport(ds, opt.read.on_corrupt is OnCorrupt.RAISE,
                                     opt.read.max_corrupt_fraction,
                                     checked=opt.read.verify_crc and ds.has_checksums)
        self._nonfinite_warned: set[int] = set()   # epochs whose all-NaN batch was reported
        self._last_batch: Batch | None = None
        # the backend starts its reader processes now, before anything touches CUDA
        self._backend = BACKENDS[backend](BackendConfig(
            source=self.source, spec=self.spec, batch_size=self.batch_size,
            channels=int(ds.channels), device=self.device, workdir=self.workdir,
            num_workers=self.num_workers,
            num_threads=opt.decode.num_threads or threads,
            prefetch=opt.decode.prefetch, seed=self.seed,
            py_start_method=opt.decode.py_start_method, payload=opt.decode.payload))

    @classmethod
    def for_eval(cls, ds, batch_size: int, augment: str | None = None, backend: str = "dali",
                 device: str | None = None, seed: int = 0, num_workers: int | None = None,
                 options: LoaderOptions | None = None) -> "Loader":
        """A loader that yields every sample exactly once, unaugmented, last batch padded."""
        from dataclasses import replace
        opt = replace(options or LoaderOptions(), train=False)
        return cls(ds, batch_size, keep=1.0, policy="full", seed=seed, backend=backend,
                   device=device, augment=augment, mixup=False, num_workers=num_workers,
                   options=opt)

    # -- planning -------------------------------------------------------------------------
    def batch_plan(self, epoch: int) -> BatchPlan:
        """This rank's batches of ``epoch`` (planned once per epoch; syncs scores once).

        Training: padding rows carry real samples of this rank's plan (``fill``, from its
        start; the whole plan's if this rank has none) at weight 0, so that a model in
        training mode never sees a fake image; evaluation: the filler.  An epoch resumed
        on another world size plans what its earlier parts left (``remaining_plan``), its
        steps numbered on from theirs (``BatchPlan.first_step``).
        """
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        segments = self._segments(epoch)
        if not self.train:
            plan = eval_plan(self.n, self.ds.byte_order, self.world_size)
        else:
            if self._synced_epoch != epoch:
                self.scores.sync(epoch)
                self._synced_epoch = epoch
            plan = self.planner.plan(epoch)
            check_plan_digest(plan)
            if segments:
                plan = remaining_plan(plan, segments, self.batch_size, self.world_size)
        mine = plan.rank(self.rank)
        pool = None
        if self.train:
            pool = mine.ids[mine.ids >= 0]
            if not len(pool):
                pool = plan.ids[plan.ids >= 0]
        bp = cut_batches(mine.ids, mine.weights, mine.mixup, self.batch_size, self.last_batch,
                         fill_from=pool, first_step=sum(s for _, s in segments))
        self._plan = (epoch, bp)
        return bp

    def _segments(self, epoch: int) -> tuple[tuple[int, int], ...]:
        """The earlier parts of ``epoch`` (world size, steps) when it resumed on another world size."""
        return self._layout[1] if self._layout[0] == epoch else ()

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Batches this rank yields in ``epoch`` (known before the epoch starts), counted
        from step 0 (an epoch resumed on another world size: its earlier parts' steps too)."""
        drop = self.last_batch is LastBatch.DROP
        segments = self._segments(epoch) if self.train else ()
        if segments:  # what the earlier parts left of K planned samples, re-sliced
            k = self.policy.num_selected(self.n, epoch)
            left = remaining_plan(eval_plan(k, None, 1), segments, self.batch_size, self.world_size)
            return sum(s for _, s in segments) + num_steps(left.num_planned, self.world_size,
                                                           self.batch_size, drop)
        if self.train:
            return int(self.planner.steps_per_epoch(epoch, self.batch_size, drop))
        per = -(-self.n // self.world_size)
        return -(-per // self.batch_size)

    # -- iteration ------------------------------------------------------------------------
    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Iterate the batches of ``epoch`` (resuming mid-epoch after ``load_state_dict``).

        One epoch streams at a time: starting to iterate another (or the same epoch again)
        ends one still in progress, as a ``break`` out of it would."""
        if self._backend is None:
            raise RuntimeError(f"{self!r} is closed: make a new Loader to iterate again")
        box: list = []
        it = self._epoch(epoch, box)
        box.append(it)
        return it

    def _epoch(self, epoch: int, box: list) -> Iterator[Batch]:
        me = box.pop()  # no reference from the frame to itself: a dropped iterator is collected
        live = self._live() if self._live is not None else None
        if live is not None and live is not me:
            live.close()  # its `finally` stops its backend epoch now, not when collected later
        self._live = weakref.ref(me)
        del me
        t_start = time.perf_counter()
        bp = self.batch_plan(epoch)
        first = 0
        if self._resume is not None and self._resume[0] == epoch:
            first = min(self._resume[1], bp.steps)
        self._resume = None
        first = max(first, bp.first_step)
        st = EpochStats(epoch=epoch, rank=self.rank, world_size=self.world_size,
                        resumed_at_step=first,
                        samples_planned=int((bp.ids[bp.row(first):] >= 0).sum()), dataset_samples=self.n,
                        dataset_payload=int(np.asarray(self.ds.length, dtype=np.int64).sum()),
                        dataset_file_bytes=int(np.asarray(self.ds.file_sizes).sum()))
        self._stats[epoch] = st
        self._position = (epoch, first)
        if first >= bp.steps:
            return
        header = TableHeader(epoch=epoch, first_step=first, rank=self.rank, seed=self.seed)
        raws = self._backend.start(bp.rows(first), header)
        step, finished = first, False
        try:
            while True:
                t0 = time.perf_counter()
                raw = next(raws, None)
                if raw is None:
                    finished = True
                    break
                st.wait_s += time.perf_counter() - t0
                batch = self._make_batch(epoch, step, raw, bp, st)
                st.steps += 1
                step += 1
                self._position = (epoch, step)
                st.epoch_s = time.perf_counter() - t_start
                self._last_batch = batch
                yield batch
        finally:
            if not finished and self._backend is not None:  # the caller left early (or an error)
                st.add_abandoned(self._backend.abandon())
            raws.close()
            st.epoch_s = time.perf_counter() - t_start
        if step != bp.steps:
            raise RuntimeError(f"epoch {epoch}: backend delivered {step - first} of "
                               f"{bp.steps - first} batches")

    def _make_batch(self, epoch: int, step: int, raw: RawBatch, bp: BatchPlan,
                    st: EpochStats) -> Batch:
        st.add_reads(raw.reads)
        st.decode_s += raw.decode_s
        row = bp.row(step)
        ids = bp.ids[row]
        meta = raw.meta
        if not np.array_equal(meta["id"], ids):  # the backend must deliver the planned batch
            raise RuntimeError(f"epoch {epoch} step {step}: backend delivered ids "
                               f"{meta['id'][:8].tolist()}..., planned {ids[:8].tolist()}...")
        corrupt = (meta["flag"] == Flag.CORRUPT) & (ids >= 0)
        fields, undecodable = decode_fields(raw.fields, self.field_kinds)
        why = {int(ids[j]): w for j, w in undecodable.items() if ids[j] >= 0}
        if why:  # a field member that does not decode makes its sample a corrupt one
            corrupt |= np.isin(ids, list(why))
            blank_rows(fields, self.field_kinds, np.flatnonzero(corrupt).tolist())
        if corrupt.any():
            self._corrupt(ids[corrupt], st, why)
        ids = np.where(corrupt, -1, ids)
        valid = ids >= 0
        st.samples_delivered += int(valid.sum())
        st.samples_padding += int((meta["flag"] == Flag.PAD).sum())
        dev = self.device
        images = raw.images.to(dev, non_blocking=True)
        info = None
        mix = bp.mixup[row]
        if self.mixup and mix.any():
            partner, lam, mixed = draw_mixup(mix, valid, self.options.batch.mixup_alpha,
                                             self.seed, epoch, self.rank, step)
            if mixed.any():
                info = MixInfo(torch.from_numpy(partner), torch.from_numpy(lam),
                               torch.from_numpy(mixed)).to(dev)
                images = apply_mixup(images, info)
        labels = np.where(valid, meta["label"], 0).astype(np.int64)
        weights = np.where(valid, bp.weights[row], 0).astype(np.float32)
        return Batch(images=images, labels=torch.from_numpy(labels).to(dev),
                     ids=torch.from_numpy(ids.astype(np.int64)).to(dev),
                     weights=torch.from_numpy(weights).to(dev), mix=info, epoch=epoch, step=step,
                     fields=fields)

    def _corrupt(self, bad_ids: np.ndarray, st: EpochStats, why: dict[int, str] | None = None) -> None:
        """Count and mask corrupt samples; warn once per shard, stop past
        ``max_corrupt_fraction`` (read/corrupt.py)."""
        self._report.check_raise(bad_ids, why)
        self.bad.mark(bad_ids)  # later epochs skip them without reading their bytes
        st.samples_corrupt += len(bad_ids)
        st.corrupt_ids.extend(int(i) for i in bad_ids)
        self._report.report(bad_ids, st.epoch, st.corrupt_ids, st.samples_planned, why)

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
        if (weights is None and last is not None and last.mix is not None and torch.is_tensor(ids)
                and ids.shape == last.ids.shape and torch.equal(ids.detach().to(last.ids.device), last.ids)):
            losses, weights = last.score_update(losses)
        detach = lambda x: x.detach() if torch.is_tensor(x) else x  # noqa: E731
        real, bad = self.scores.update(detach(ids), detach(losses), detach(weights))
        self._check_planned(ids)
        if bad and last is not None:    # counted in stats; the first of an epoch warns
            self._stats[last.epoch].num_nonfinite += bad
            if last.epoch not in self._nonfinite_warned:
                self._nonfinite_warned.add(last.epoch)
                what = (f"all {real} losses of the batch are" if bad == real else
                        f"{bad} of the batch's {real} losses are")
                warnings.warn(f"epoch {last.epoch} step {last.step}: {what} NaN/inf (diverged? lower "
                              "the LR); the scores ignore them (counted in stats().num_nonfinite)",
                              RuntimeWarning, stacklevel=2)

    def _check_planned(self, ids) -> None:
        """Warn once if reported ids were not planned this epoch (labels passed for ids?)."""
        if self._plan is None or self._unplanned_warned:
            return
        epoch, bp = self._plan
        if self._planned is None or self._planned[0] != epoch:
            mask = np.zeros(self.n, bool)
            mask[bp.ids[bp.ids >= 0]] = True
            self._planned = (epoch, mask)
        got = np.asarray(ids.detach().cpu() if torch.is_tensor(ids) else ids).reshape(-1)
        got = got[(got >= 0) & (got < self.n)]   # out of range: Scores.update refused those
        off = got[~self._planned[1][got]]
        if len(off):
            self._unplanned_warned = True
            warnings.warn(f"update(): {len(off)} of {len(got)} ids (e.g. {off[:3].tolist()}) are not in "
                          f"epoch {epoch}'s plan: pass batch.ids (not the labels) with each batch's "
                          "losses", RuntimeWarning, stacklevel=3)

    def stats(self, epoch: int | None = None) -> EpochStats:
        """Counters of ``epoch`` (default: the latest epoch started)."""
        if epoch is None:
            epoch = max(self._stats) if self._stats else 0
        if epoch not in self._stats:
            raise KeyError(f"no stats for epoch {epoch}: epochs started so far {sorted(self._stats)}")
        return self._stats[epoch]

    def close(self) -> None:
        """Stop worker processes and remove the loader's temporary files."""
        if self._backend is not None:
            backend, self._backend = self._backend, None
            backend.close()
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
