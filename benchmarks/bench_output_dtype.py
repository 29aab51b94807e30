"""Is it faster to hand uint8 images to torch and normalise there than float from DALI?

    python benchmarks/bench_output_dtype.py --data /tmp/photos-wds --repeats 3

Two DALI pipelines on the same shards (``fn.readers.webdataset``, ROI decode, resize 224,
flip), CPU only, rows interleaved: ``float`` ends in ``crop_mirror_normalize`` (float CHW,
what the Loader delivers) and is copied into a reused float tensor; ``uint8`` ends in a flip
(uint8 HWC, a quarter of the bytes), is copied into a reused uint8 tensor, then permuted,
converted and normalised by torch (``--torch-threads``) as a training device would.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make(shards, dtype: str, batch: int, threads: int):
    import torch
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from pipeline.decode.augment import IMAGENET_MEAN, IMAGENET_STD
    idx = [s[:-4] + ".idx" for s in shards]
    pipe = Pipeline(batch_size=batch, num_threads=threads, device_id=None, seed=0, prefetch_queue_depth=2)
    with pipe:
        jpg, cls = fn.readers.webdataset(paths=shards, index_paths=idx, ext=["jpg", "cls"],
                                         random_shuffle=False, name="r")
        img = fn.decoders.image_random_crop(jpg, device="cpu", output_type=types.RGB)
        img = fn.resize(img, size=[224, 224], antialias=True)
        if dtype == "uint8":
            img = fn.flip(img, horizontal=fn.random.coin_flip())
        else:
            img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                           mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                           mirror=fn.random.coin_flip())
        pipe.set_outputs(img, cls)
    pipe.build()
    n = pipe.epoch_size("r")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    bufs: dict = {}

    def run() -> int:
        for _ in range(-(-n // batch)):
            img, _ = pipe.run()
            t = img.as_tensor()
            shape = tuple(t.shape())
            if shape not in bufs:
                bufs[shape] = torch.empty(shape, dtype=torch.uint8 if dtype == "uint8" else torch.float32)
            feed_ndarray(t, bufs[shape])
            if dtype == "uint8":
                bufs[shape].permute(0, 3, 1, 2).float().sub_(mean).div_(std)
        return n
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.torch_threads)
    shards = sorted(glob.glob(os.path.join(a.data, "*.tar")))
    rows = {k: make(shards, k, a.batch, a.threads) for k in ("float", "uint8")}
    for r in rows.values():
        r()  # warm-up
    res = {k: [] for k in rows}
    for rep in range(a.repeats):
        for k in (list(rows) if rep % 2 == 0 else list(rows)[::-1]):
            t = time.perf_counter()
            m = rows[k]()
            res[k].append(m / (time.perf_counter() - t))
    for k, v in res.items():
        print(f"{k:6s} img/s per round {[round(x) for x in v]}  best {max(v):.0f}  "
              f"uint8/float best {max(res['uint8']) / max(res['float']):.2f}")


if __name__ == "__main__":
    main()
