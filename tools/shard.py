"""Convert an image dataset to indexed WebDataset shards or a Zarr v3 store, or verify one.

    python tools/shard.py SRC OUT --format wds|zarr [--split train|test]
        [--samples-per-shard N | --shard-bytes B] [--workers N] [--seed S] [--no-shuffle]
        [--encode png|jpeg|npy --quality Q] [--resize HxW] [--limit N] [--name NAME]
        [--source-type imagefolder|cifar|idx|npz] [--overwrite] [--strict] [--stage DIR]
    python tools/shard.py --verify OUT
    python tools/shard.py index SHARDS OUT [--label cls|txt|json:PATH|key:REGEX] [--fields txt,json]
        [--workers N] [--strict]

SRC: an ImageFolder tree (SRC/<class>/<file>), CIFAR-10/100 python batches, MNIST-family
IDX files, or an .npz with x/y. OUT may be ``s3://bucket/prefix``: the dataset is staged
in a local directory (``--stage``), uploaded, each object verified, the manifest last;
endpoint and credentials from AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
``index`` writes a manifest for existing WebDataset shards
(a directory, glob, brace pattern, list file or URLs) without copying them. Formats and
manifest: docs/formats.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib").rstrip("b") if text[-1:].lower() == "b" else text.lower()
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G, 500000)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return n


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in lo..hi (an error naming the option otherwise)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(
                f"must be {lo}..{hi}, got {n}" if hi is not None else f"must be >= {lo}, got {n}")
        return n
    parse.__name__ = "int"
    return parse


def _resize(text: str) -> tuple[int, int]:
    from pipeline.formats.convert import parse_resize
    try:
        return parse_resize(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", help="source dataset (directory or .npz)")
    p.add_argument("out", nargs="?", help="output directory, or s3://bucket/prefix")
    p.add_argument("--verify", metavar="OUT", help="re-read every sample of OUT and check it")
    p.add_argument("--format", choices=("wds", "zarr"), default="wds")
    p.add_argument("--source-type", choices=("imagefolder", "cifar", "idx", "npz"))
    p.add_argument("--split", help="train or test (IDX, CIFAR batches, SRC/<split>/ trees)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--samples-per-shard", type=_int_in(1), metavar="N")
    g.add_argument("--shard-bytes", type=_size, metavar="B",
                   help="target shard size, e.g. 64M (default 64 MiB)")
    p.add_argument("--workers", type=_int_in(1), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--encode", choices=("png", "jpeg", "npy"),
                   help="re-encode images (default: encoded images byte for byte, arrays as PNG)")
    p.add_argument("--quality", type=_int_in(1, 100), default=95,
                   help="JPEG quality for --encode jpeg (1..100)")
    p.add_argument("--resize", type=_resize, metavar="HxW",
                   help="resize every image to HxW (bicubic)")
    p.add_argument("--limit", type=_int_in(1), metavar="N",
                   help="keep the first N samples after the shuffle")
    p.add_argument("--name", help="shard name prefix (default 'shard')")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in OUT")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    p.add_argument("--stage", metavar="DIR",
                   help="local stage of an s3:// OUT (default: under ~/.cache/swdpp/stage)")
    p.add_argument("--no-progress", action="store_true")
    return p


def build_index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shard.py index",
                                description="Index existing WebDataset shards in place (headers only).")
    p.add_argument("shards", help="directory, glob, brace pattern, file listing shards, or URL(s)")
    p.add_argument("out", help="output directory (manifest + DALI index files)")
    p.add_argument("--label", default="cls",
                   help="cls (default) | cls2 | txt | json:PATH (e.g. json:meta.class) | key:REGEX")
    p.add_argument("--fields", default="", metavar="EXT,...",
                   help="extra members to record per sample and deliver as batch.fields "
                        "(e.g. txt,json); a sample without one is skipped (--strict: refused)")
    p.add_argument("--workers", type=_int_in(1), default=4, help="shards indexed at once")
    p.add_argument("--strict", action="store_true", help="fail on the first bad shard or sample")
    p.add_argument("--no-progress", action="store_true")
    return p


def index_main(argv: list[str]) -> int:
    args = build_index_parser().parse_args(argv)
    import time
    from pipeline.formats.index import IndexError_, index
    t0 = time.perf_counter()
    try:
        s = index(args.shards, args.out, label=args.label, strict=args.strict,
                  workers=args.workers, progress=not args.no_progress, fields=args.fields)
    except (IndexError_, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"indexed: {s['out']} ({s['num_samples']:,} samples in {s['num_shards']} shards, "
          f"{s['num_samples'] / dt:,.0f} samples/s)")
    if s["bytes_fetched"]:
        print(f"  remote header bytes fetched {_fmt_bytes(s['bytes_fetched'])} of "
              f"{_fmt_bytes(s['shard_bytes'])} ({s['bytes_fetched'] / s['shard_bytes']:.2%})")
    for msg in s["skipped"][:20]:
        print(f"  skipped: {msg}")
    if len(s["skipped"]) > 20:
        print(f"  ... and {len(s['skipped']) - 20} more skipped")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["index"]:
            return index_main(argv[1:])
        return convert_main(argv)
    except KeyboardInterrupt:
        # Ctrl-C: one line, not a traceback; a conversion resumes where it stopped
        # (its shards are journaled), an index or a verify simply starts again
        print("\ninterrupted: rerun the same command to resume" if argv[:1] != ["index"]
              and "--verify" not in argv else "\ninterrupted", file=sys.stderr)
        return 130


def convert_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.formats import ConvertError, SourceError, VerifyError, convert, verify
    if args.verify:
        try:
            report = verify(args.verify, progress=not args.no_progress)
        except VerifyError as e:
            print(f"verify FAILED: {e}", file=sys.stderr)
            return 1
        what = report["checks"]
        print(f"verify OK: {report['num_samples']} samples in {report['num_files']} "
              f"{report['format']} files, {', '.join(what[:-1])} and {what[-1]} match"
              + ("" if "per-sample CRC32" in what else " (indexed in place: no checksums to compare)"))
        return 0
    if not args.src or not args.out:
        build_parser().error("SRC and OUT are required (or --verify OUT)")
    extra = {"stage": args.stage} if args.stage and "://" in args.out else {}
    try:
        s = convert(args.src, args.out, **extra, format=args.format, source_type=args.source_type,
                    split=args.split, samples_per_shard=args.samples_per_shard,
                    shard_bytes=args.shard_bytes, workers=args.workers, seed=args.seed,
                    shuffle=not args.no_shuffle, encode=args.encode, quality=args.quality,
                    resize=args.resize, overwrite=args.overwrite, strict=args.strict,
                    limit=args.limit, name=args.name, progress=not args.no_progress)
    except (ConvertError, SourceError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "stage" in s:
        print(f"{s['out']}: {s['status']} ({s['num_samples']} samples, {s['num_shards']} "
              f"shards; {s['uploaded']} object(s) uploaded and verified, "
              f"{s['upload_skipped']} already there; stage {s['stage']})")
        return 0
    if s["status"] == "already complete":
        print(f"{s['out']}: already complete ({s['num_samples']} samples, {s['num_shards']} "
              "shards); nothing to do")
        return 0
    print(f"\n{s['status']}: {s['out']} ({s['format']}, codec {s['codec']})")
    print(f"  samples        {s['num_samples']:>12,}   skipped (unreadable) {s['skipped_samples']}")
    print(f"  shards         {s['num_shards']:>12,}   written {s['shards_written']}, "
          f"resumed {s['shards_skipped']}")
    print(f"  payload        {_fmt_bytes(s['payload_bytes']):>12}")
    print(f"  on disk        {_fmt_bytes(s['bytes_on_disk']):>12}   "
          f"({s['disk_per_payload']:.2f} bytes per payload byte)")
    print(f"  time           {s['seconds']:>11.2f}s   {s['images_per_s']:,.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
