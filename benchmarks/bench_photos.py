"""Loader throughput on ImageNet-size photographs, side by side in one run (imagenet preset).

    python benchmarks/make_photos.py --out /tmp/photos --count 2000
    python tools/shard.py /tmp/photos/train /tmp/photos-wds --format wds --samples-per-shard 250
    python benchmarks/bench_photos.py --data /tmp/photos-wds --repeats 3

Rows (random-resized-crop 224, flip, normalize; batch ``--batch``; ``--threads`` DALI CPU
threads; CPU only):
  * ``loader``: pipeline.Loader, DALI backend, keep 1.0 (policy full), the Loader's defaults;
    ``loader_k0.7`` / ``loader_k0.5`` (policy uniform: exact fractions from epoch 0);
    ``loader_torch``: the torch backend, 2 workers;
  * ``dali_reader``: DALI ``fn.readers.webdataset`` on the same shards, ``decoders.image`` +
    ``random_resized_crop``; ``dali_roi``: ``decoders.image_random_crop`` (ROI decode) +
    ``resize``, DALI's usual idiom;
  * ``wds_torch``: webdataset + DataLoader (2 workers) + torchvision v2 (``decode_jpeg``,
    RandomResizedCrop, flip, normalize).
A cold epoch per row first (shards evicted: block-device bytes read; also the warm-up),
then ``--repeats`` rounds with rows interleaved (rotating order); best and median
images/s, CPU microseconds per image (all processes involved), the Loader rows' requested
bytes, and the Loader's resident memory after every epoch.  Figures go to
docs/benchmarks.md with the machine and date.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", category=DeprecationWarning)

from bench_loader import _dev_stat_path, evict, sectors_read, timed  # noqa: E402

SIZE = 224


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def loader_row(ds, keep: float, backend: str, batch: int, threads: int, workers=None):
    import pipeline
    L = pipeline.Loader(ds, batch_size=batch, keep=keep, policy="full" if keep >= 1 else "uniform",
                        epochs=1000, seed=0, backend=backend, device="cpu", augment="imagenet",
                        num_workers=workers, options=pipeline.LoaderOptions.of(num_threads=threads))
    e = [0]

    def run():
        n = 0
        for b in L.epoch(e[0]):
            n += int((b.ids >= 0).sum())
        e[0] += 1
        return n, L.stats(e[0] - 1)
    return run


def dali_row(shards, batch: int, threads: int, roi: bool):
    import torch
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from pipeline.decode.augment import IMAGENET_MEAN, IMAGENET_STD
    idx = [s[:-4] + ".idx" for s in shards]
    pipe = Pipeline(batch_size=batch, num_threads=threads, device_id=None, seed=0, prefetch_queue_depth=2)
    with pipe:
        jpg, cls = fn.readers.webdataset(paths=shards, index_paths=idx, ext=["jpg", "cls"],
                                         random_shuffle=False, name="r")
        if roi:
            img = fn.decoders.image_random_crop(jpg, device="cpu", output_type=types.RGB)
            img = fn.resize(img, size=[SIZE, SIZE], antialias=True)
        else:
            img = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
            img = fn.random_resized_crop(img, size=[SIZE, SIZE], antialias=True)
        img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                       mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                       mirror=fn.random.coin_flip())
        pipe.set_outputs(img, cls)
    pipe.build()
    total = pipe.epoch_size("r")

    def run():
        n = 0
        for _ in range(-(-total // batch)):
            img, cls = pipe.run()
            torch.from_numpy(np.array(img.as_tensor(), copy=True))  # the same hand-off to torch
            n += len(cls)
        return min(n, total), None
    return run


def wds_row(shards, batch: int, workers: int):
    import torch
    import webdataset as wds
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2
    from pipeline.decode.augment import IMAGENET_MEAN, IMAGENET_STD
    tf = v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])

    def decode(sample):
        jpg, cls = sample
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return tf(img), int(cls)

    def run():
        ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).to_tuple("jpg", "cls").map(decode)
        dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
        return sum(len(y) for _, y in dl), None
    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="WebDataset shards written by tools/shard.py")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", nargs="*", default=["loader", "loader_k0.7", "loader_k0.5", "loader_torch",
                                                  "dali_reader", "dali_roi", "wds_torch"])
    a = ap.parse_args(argv)
    import pipeline
    ds = pipeline.open_dataset(a.data)
    shards = sorted(glob.glob(os.path.join(a.data, "*.tar")))
    make = {"loader": lambda: loader_row(ds, 1.0, "dali", a.batch, a.threads),
            "loader_k0.7": lambda: loader_row(ds, 0.7, "dali", a.batch, a.threads),
            "loader_k0.5": lambda: loader_row(ds, 0.5, "dali", a.batch, a.threads),
            "loader_torch": lambda: loader_row(ds, 1.0, "torch", a.batch, a.threads, workers=2),
            "dali_reader": lambda: dali_row(shards, a.batch, a.threads, roi=False),
            "dali_roi": lambda: dali_row(shards, a.batch, a.threads, roi=True),
            "wds_torch": lambda: wds_row(shards, a.batch, 2)}
    runs = {r: make[r]() for r in a.rows}
    dev = _dev_stat_path(shards[0])
    res = {r: {"ips": [], "cpu": [], "rss": []} for r in a.rows}
    for r in a.rows:  # cold epoch (and warm-up)
        evict(shards)
        s0 = sectors_read(dev)
        n, dt, st, cpu = timed(runs[r])
        res[r]["cold_bytes"] = (sectors_read(dev) - s0) * 512 if dev else -1
        res[r]["requested"] = st.bytes_read if st is not None else None
        print(f"cold {r:13s} {n / dt:7.0f} img/s  device {res[r]['cold_bytes'] / 1e6:7.1f} MB", flush=True)
    for k in range(a.repeats):
        order = a.rows[k % len(a.rows):] + a.rows[:k % len(a.rows)]
        for r in order:
            n, dt, st, cpu = timed(runs[r])
            res[r]["ips"].append(n / dt)
            res[r]["cpu"].append(1e6 * cpu / max(n, 1))
            res[r]["rss"].append(rss_mb())
            print(f"round {k} {r:13s} {n / dt:7.0f} img/s {1e6 * cpu / max(n, 1):8.0f} CPU us/img", flush=True)
    base = res.get("loader")
    print(f"\n{'row':13s} {'best':>7s} {'median':>7s} {'CPU us/img':>10s} {'loader/row':>10s} "
          f"{'cold MB':>8s} {'requested MB':>12s}")
    for r in a.rows:
        x = res[r]
        best, med = max(x["ips"]), statistics.median(x["ips"])
        rel = f"{max(base['ips']) / best:.2f}/{statistics.median(base['ips']) / med:.2f}" if base else "-"
        req = f"{x['requested'] / 1e6:12.1f}" if x["requested"] is not None else f"{'-':>12s}"
        print(f"{r:13s} {best:7.0f} {med:7.0f} {statistics.median(x['cpu']):10.0f} {rel:>10s} "
              f"{x['cold_bytes'] / 1e6:8.1f} {req}")
    print(f"process RSS after each timed epoch (MB): {[round(v) for v in res[a.rows[-1]]['rss']]}")
    return res


if __name__ == "__main__":
    main()
