"""GPU loader throughput, side by side in one run (needs one CUDA GPU; run by gpu_check.sh).

    python benchmarks/bench_gpu.py --data /tmp/photos-wds --repeats 3

Rows (imagenet preset: random-resized crop 224, flip, normalize; batch ``--batch``):
  * ``loader`` / ``loader_k0.7``: pipeline.Loader, DALI backend on ``cuda`` (``mixed``
    decode of the planned crop window, augmentation on the GPU, batches stay on the GPU),
    policy full at keep 1.0, uniform at keep 0.7; suffixes ``_wN`` (reader processes),
    ``_tN`` (DALI threads), ``_qN`` (prefetch depth), ``_packed`` / ``_rows``
    (``DecodeOptions.payload``) override the Loader's defaults, e.g. ``loader_w4_t8``;
  * ``dali_reader``: DALI ``fn.readers.webdataset`` + ``decoders.image_random_crop``
    (``mixed``) + ``resize`` + ``crop_mirror_normalize`` on the GPU, output handed to torch
    on the GPU (no host round trip); ``dali_reader_tN``: with N DALI threads;
  * ``dali_es[_wN]``: the same graph fed by a parallel ``external_source`` (N processes,
    default 4, reading each batch with ``os.pread``, one pipeline reset per epoch, as the
    Loader is fed): what feeding costs, without the Loader's checks, plan and crop windows;
  * ``dali_es_slice[_wN]``: as ``dali_es``, but the feed also draws each batch's crop
    windows and flips as the Loader's reader processes do (header sizes, ``sample_params``,
    pixel windows) and the graph decodes with ``decoders.image_slice`` fed those windows
    (the Loader's decode), four outputs a batch: what the Loader's decode and windows cost
    against DALI's ``image_random_crop``, without the rest of the Loader;
  * ``tv_cuda``: webdataset + DataLoader (``--tv-workers``, raw bytes) + ``torchvision.io.decode_jpeg
    (device="cuda")`` on the batch + torchvision v2 resized crop / flip / normalize on the GPU.
One warm-up epoch per row, then ``--repeats`` rounds with the rows interleaved; best and
median images/s and milliseconds per batch (the GPU synchronised at the end of each epoch),
the wait for each epoch's first batch and the images/s of the rest of the epoch (a Loader
restarts its pipeline per epoch, with the next epoch's plan; DALI's reader runs on).
A row whose library is missing (DALI not installed) is reported as skipped, not timed.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
import traceback
import warnings
from datetime import date

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=DeprecationWarning)

SIZE = 224


def loader_row(ds, keep: float, batch: int, threads: int | None, workers: int | None = None,
               payload: str = "packed", prefetch: int | None = None):
    import pipeline
    L = pipeline.Loader(ds, batch_size=batch, keep=keep, policy="full" if keep >= 1 else "uniform",
                        epochs=1000, seed=0, backend="dali", device="cuda", augment="imagenet",
                        **({} if workers is None else {"num_workers": workers}),
                        options=pipeline.LoaderOptions.of(
                            num_threads=threads, payload=payload,  # None: defaults
                            **({} if prefetch is None else {"prefetch": prefetch})))
    e = [0]

    def run():
        n, first = 0, None
        for b in L.epoch(e[0]):
            assert b.images.is_cuda
            n += int((b.ids >= 0).sum())
            first = first or (time.perf_counter(), n)
        e[0] += 1
        return n, first
    return run


def dali_row(shards, batch: int, threads: int):
    import torch
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from pipeline.decode.augment import IMAGENET_MEAN, IMAGENET_STD
    idx = [s[:-4] + ".idx" for s in shards]
    pipe = Pipeline(batch_size=batch, num_threads=threads, device_id=0, seed=0, prefetch_queue_depth=2)
    with pipe:
        jpg, cls = fn.readers.webdataset(paths=shards, index_paths=idx, ext=["jpg", "cls"],
                                         random_shuffle=False, name="r")
        img = fn.decoders.image_random_crop(jpg, device="mixed", output_type=types.RGB)
        img = fn.resize(img, size=[SIZE, SIZE], antialias=True)
        img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                       mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                       mirror=fn.random.coin_flip())
        pipe.set_outputs(img, cls)
    pipe.build()
    total = pipe.epoch_size("r")
    buf = {}

    def run():
        n, first = 0, None
        for _ in range(-(-total // batch)):
            img, cls = pipe.run()
            t = img.as_tensor()
            shape = tuple(t.shape())
            if shape not in buf:
                buf[shape] = torch.empty(shape, dtype=torch.float32, device="cuda")
            feed_ndarray(t, buf[shape], cuda_stream=torch.cuda.current_stream())
            n += len(cls)
            first = first or (time.perf_counter(), n)
        return min(n, total), first
    return run


class _PreadFeed:
    """Batch callback of the ``dali_es`` row: batch ``i`` of the dataset in file order, read
    with ``os.pread`` (no checks, no plan, no crop parameters; short last batch padded with
    the first samples).  Picklable, so DALI may start its workers with spawn."""

    def __init__(self, paths, file, offset, length, batch: int, windows: bool = False):
        self.paths, self.batch, self.windows = list(paths), batch, windows
        self.file, self.offset, self.length = (np.asarray(a, dtype=np.int64) for a in (file, offset, length))
        self.fds: dict[int, int] = {}

    def __call__(self, info):
        lo = info.iteration * self.batch
        if lo >= len(self.file):
            raise StopIteration
        rows = np.arange(lo, lo + self.batch) % len(self.file)
        out = []
        for r in rows.tolist():
            f = int(self.file[r])
            if f not in self.fds:
                self.fds[f] = os.open(self.paths[f], os.O_RDONLY)
            out.append(np.frombuffer(os.pread(self.fds[f], int(self.length[r]), int(self.offset[r])),
                                     dtype=np.uint8))
        if not self.windows:
            return out
        from pipeline.decode.augment import get_augment, sample_params
        from pipeline.decode.dali_backend import _pixel_windows
        from pipeline.formats.imagesize import batch_hw
        spec = get_augment("imagenet", True, 3, None, SIZE)
        hw = batch_hw(out)
        p = sample_params(spec, len(out), 0, info.epoch_idx, 0, info.iteration, hw)
        anchor, shape = _pixel_windows(p.anchor, p.shape, hw)
        return out, anchor, shape, p.flip


def es_row(ds, batch: int, threads: int, workers: int, slice_: bool = False):
    """The dali_reader's graph fed by a parallel external source (``workers`` processes, one
    pipeline reset per epoch, as the Loader's): what the feeding alone costs; ``slice_``:
    windows and flips drawn in the feed and decoded by ``image_slice`` (the Loader's decode)."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from pipeline.decode.augment import IMAGENET_MEAN, IMAGENET_STD
    try:
        from nvidia.dali import backend as _b
        method = "spawn" if _b.IsDriverInitialized() else "fork"
    except Exception:  # noqa: BLE001
        method = "spawn"
    pipe = Pipeline(batch_size=batch, num_threads=threads, device_id=0, seed=0, prefetch_queue_depth=2,
                    py_num_workers=workers, py_start_method=method, exec_dynamic=True)
    with pipe:
        feed = _PreadFeed(ds.files, ds.file, ds.offset, ds.length, batch, windows=slice_)
        if slice_:
            jpg, anchor, shape, flip = fn.external_source(
                source=feed, num_outputs=4, batch=True, batch_info=True, parallel=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32], prefetch_queue_depth=2)
            img = fn.decoders.image_slice(jpg, anchor, shape, axes=[0, 1], normalized_anchor=False,
                                          normalized_shape=False, device="mixed", output_type=types.RGB)
        else:
            jpg = fn.external_source(source=feed, batch=True, batch_info=True, parallel=True,
                                     dtype=types.UINT8, prefetch_queue_depth=2)
            img = fn.decoders.image_random_crop(jpg, device="mixed", output_type=types.RGB)
            flip = fn.random.coin_flip()
        img = fn.resize(img, size=[SIZE, SIZE], antialias=True)
        img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                       mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                       mirror=flip)
        pipe.set_outputs(img)
    pipe.start_py_workers()
    pipe.build()
    total = len(ds)

    def run():
        import torch
        n, first = 0, None
        while True:
            try:
                (img,) = pipe.run()
            except StopIteration:
                break
            torch.from_dlpack(img.as_tensor())
            n += batch
            first = first or (time.perf_counter(), n)
        pipe.reset()
        return min(n, total), first
    return run


def tv_row(shards, batch: int, workers: int):
    import torch
    import webdataset as wds
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    from pipeline.decode.augment import IMAGENET_MEAN, IMAGENET_STD
    crop = v2.RandomResizedCrop(SIZE, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device="cuda").view(1, 3, 1, 1)

    def raw(sample):
        jpg, cls = sample
        return torch.frombuffer(bytearray(jpg), dtype=torch.uint8), int(cls)

    def collate(items):
        return [x for x, _ in items], torch.tensor([y for _, y in items])

    def run():
        ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).to_tuple("jpg", "cls").map(raw)
        dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate)
        n, first = 0, None
        for data, y in dl:
            imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
            x = torch.stack([crop(im) for im in imgs]).float()
            flip = torch.rand(len(x), device="cuda") < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            x = (x - mean) / std
            n += len(y)
            first = first or (time.perf_counter(), n)
        return n, first
    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="WebDataset shards written by tools/shard.py")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=8, help="DALI CPU threads of the dali_reader row")
    ap.add_argument("--tv-workers", type=int, default=4, help="DataLoader workers of tv_cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", nargs="*", default=["loader", "loader_k0.7", "dali_reader", "tv_cuda"],
                    help="loader rows take _kKEEP, _wWORKERS (reader processes), _tTHREADS (DALI "
                         "threads), _qPREFETCH, _packed / _rows (DecodeOptions.payload) suffixes, else the "
                         "Loader's defaults: loader_k0.7, loader_w4_t8, loader_packed; "
                         "dali_reader_tTHREADS: the reader with other than --threads threads")
    ap.add_argument("--profile", metavar="ROW", help="after the table: cProfile of ROW's main thread, 2 epochs")
    a = ap.parse_args(argv)
    import torch

    import pipeline
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA GPU visible to torch")
    ds = pipeline.open_dataset(a.data)
    shards = sorted(glob.glob(os.path.join(a.data, "*.tar")))
    make = {"dali_reader": lambda: dali_row(shards, a.batch, a.threads),
            "tv_cuda": lambda: tv_row(shards, a.batch, a.tv_workers)}
    for r in a.rows:  # loader[_kKEEP][_wN][_tN][_qN][_packed|_rows], dali_reader_tTHREADS
        tokens = r.split("_")[1:]
        payload = next((t for t in tokens if t in ("packed", "rows")), "packed")
        o = {t[0]: t[1:] for t in tokens if t not in ("packed", "rows")}
        if r.startswith("loader"):
            make[r] = (lambda o, payload: lambda: loader_row(
                ds, float(o.get("k", 1.0)), a.batch, int(o["t"]) if "t" in o else None,
                int(o["w"]) if "w" in o else None, payload,
                int(o["q"]) if "q" in o else None))(o, payload)
        elif r.startswith("dali_es"):  # dali_es[_slice][_wWORKERS]
            make[r] = (lambda w, sl: lambda: es_row(ds, a.batch, a.threads, w, sl))(
                int(o.get("w", 4)), r.startswith("dali_es_slice"))
        elif r.startswith("dali_reader_t"):
            make[r] = (lambda t: lambda: dali_row(shards, a.batch, t))(int(r.rsplit("_t", 1)[1]))
    runs, skipped = {}, {}
    for r in a.rows:
        try:
            runs[r] = make[r]()
            t = time.perf_counter()
            runs[r]()                                  # warm-up epoch
            torch.cuda.synchronize()
            print(f"warm-up {r:12s} {time.perf_counter() - t:6.1f} s", flush=True)
        except ImportError as e:
            runs.pop(r, None)
            skipped[r] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - report the row as failed, time the others
            traceback.print_exc()
            runs.pop(r, None)
            skipped[r] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    rows = list(runs)
    res = {r: [] for r in rows}
    for k in range(a.repeats):
        for r in rows[k % max(1, len(rows)):] + rows[:k % max(1, len(rows))]:
            if r in skipped:
                continue
            t = time.perf_counter()
            try:
                n, (t1, n1) = runs[r]()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                skipped[r] = f"FAILED in round {k}: {type(e).__name__}"
                continue
            t2 = time.perf_counter()
            dt = t2 - t
            # the epoch; its first batch's wait (a pipeline that restarts per epoch refills
            # its queue there); the rest of the epoch (steady state)
            res[r].append((n / dt, 1e3 * dt / -(-n // a.batch), 1e3 * (t1 - t), (n - n1) / (t2 - t1)))
            print(f"round {k} {r:16s} {n / dt:8.0f} img/s  first batch {1e3 * (t1 - t):6.1f} ms  "
                  f"then {(n - n1) / (t2 - t1):8.0f} img/s", flush=True)
    rows = [r for r in rows if res[r]]
    print(f"\nGPU: {torch.cuda.get_device_name(0)}; batch {a.batch}, {len(ds):,} images, "
          f"{a.threads} DALI threads, {os.cpu_count()} CPUs; {date.today()}")
    print("epoch: whole epochs; first ms: the wait for an epoch's first batch (median); steady: "
          "the rest of the epoch (median img/s); loader/row: best/median epochs, then steady")
    print(f"{'row':16s} {'best img/s':>10s} {'median':>8s} {'ms/batch':>9s} {'first ms':>9s} "
          f"{'steady':>8s} {'loader/row':>10s} {'steady':>7s}")
    base = res.get("loader") or None

    def med(r, i):
        return statistics.median(v[i] for v in res[r])
    for r in rows:
        ips = [v[0] for v in res[r]]
        rel = (f"{max(v[0] for v in base) / max(ips):.2f}/{med('loader', 0) / med(r, 0):.2f}"
               if base else "-")
        srel = f"{med('loader', 3) / med(r, 3):.2f}" if base else "-"
        print(f"{r:16s} {max(ips):10.0f} {med(r, 0):8.0f} {med(r, 1):9.1f} {med(r, 2):9.1f} "
              f"{med(r, 3):8.0f} {rel:>10s} {srel:>7s}")
    for r, why in skipped.items():
        print(f"{r:12s} {why}")
    if a.profile in runs:
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2):
            runs[a.profile]()
        torch.cuda.synchronize()
        pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
        print(f"\nmain thread of {a.profile}, 2 epochs:" + out.getvalue().split("\n\n", 1)[-1])
    return res


if __name__ == "__main__":
    main()
