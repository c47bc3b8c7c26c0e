"""Ingest throughput and peak memory on a large folder of small PNGs.

Generates an ImageFolder tree of N 28x28 grey PNGs (10 classes, random per-image noise so no two
files are alike) in a temporary directory, then ingests it in a *child process* so that neither
the generation nor this script counts towards the measured memory. Prints one Markdown row per
N: wall time, images/s, and peak RSS (``ru_maxrss``) of the ingest process and of its decode
workers. Running it with two sizes (``--images 20000 200000``) shows whether memory grows with
the collection (it must not).

    .venv/bin/python benchmarks/bench_ingest.py --images 200000
    .venv/bin/python benchmarks/bench_ingest.py --fashion-mnist   # the 70k Fashion-MNIST ingest
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

CLASSES = 10


def _write_range(args: tuple[str, int, int, int, int]) -> int:
    """Write images [start, stop) of the collection (run in a generator process)."""
    from PIL import Image

    root, start, stop, size, seed = args
    rng = np.random.default_rng([seed, start])
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(start, stop):
        k = i % CLASSES
        base = 30 + 20 * k + 25 * np.sin((xx if k % 2 else yy) * (1 + k % 4) + rng.uniform(0, 6.3))
        img = np.clip(base + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG")
        Path(root, f"class{k:02d}", f"img{i:07d}.png").write_bytes(buf.getvalue())
    return stop - start


def generate(root: Path, n: int, size: int, procs: int, seed: int = 0) -> float:
    """Write ``n`` PNGs under ``root/classNN/``; return seconds taken."""
    t = time.perf_counter()
    for k in range(CLASSES):
        (root / f"class{k:02d}").mkdir(parents=True, exist_ok=True)
    step = 5_000
    jobs = [(str(root), s, min(s + step, n), size, seed) for s in range(0, n, step)]
    with get_context("spawn").Pool(procs) as pool:
        done = sum(pool.imap_unordered(_write_range, jobs))
    assert done == n
    return time.perf_counter() - t


def _child(source: str, src: str | None, out: str, workers: int | None, shard_rows: int) -> None:
    """Runs in the measured process: ingest, then report timing and peak RSS as JSON."""
    from streamssl.data.ingest import ingest

    t = time.perf_counter()
    summary = ingest(source, out, src, workers=workers, shard_rows=shard_rows)
    seconds = time.perf_counter() - t
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest decode worker
    print(json.dumps({"summary": summary, "seconds": seconds, "rss_mb": self_kb / 1024, "worker_rss_mb": kids_kb / 1024}))


def run_ingest(source: str, src: str | None, out: Path, workers: int | None, shard_rows: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", source, src or "", str(out), str(workers or 0), str(shard_rows)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"ingest child failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


HEADER = (
    "| input | images | workers | ingest s | images/s | peak RSS ingest MB | peak RSS worker MB | dataset MB |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def row(label: str, res: dict, out: Path, workers: int | None) -> str:
    n = res["summary"]["num_images"]
    return (
        f"| {label} | {n:,} | {workers or 'auto'} | {res['seconds']:.1f} | {n / res['seconds']:,.0f} "
        f"| {res['rss_mb']:.0f} | {res['worker_rss_mb']:.0f} | {_dir_mb(out):.1f} |"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        source, src, out, workers, shard_rows = sys.argv[2:7]
        _child(source, src or None, out, int(workers) or None, int(shard_rows))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[200_000], help="collection sizes to test")
    ap.add_argument("--size", type=int, default=28, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=None, help="ingest decode processes (default: auto)")
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--gen-procs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--tmp", default=None, help="where to generate (default: system temp dir)")
    ap.add_argument("--fashion-mnist", action="store_true", help="also time the full Fashion-MNIST ingest")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    args = ap.parse_args()

    print(f"# machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}", flush=True)
    print(HEADER, flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_", dir=args.tmp))
    try:
        for n in args.images:
            src = work / f"folder{n}"
            gen_s = generate(src, n, args.size, args.gen_procs)
            print(f"# generated {n:,} {args.size}x{args.size} PNGs in {gen_s:.1f} s", file=sys.stderr, flush=True)
            out = work / f"ds{n}"
            res = run_ingest("folder", str(src), out, args.workers, args.shard_rows)
            print(row(f"folder, {args.size}x{args.size} PNG", res, out, args.workers), flush=True)
            if not args.keep:
                shutil.rmtree(src)
                shutil.rmtree(out)
        if args.fashion_mnist:
            out = work / "fashion-mnist"
            res = run_ingest("fashion-mnist", None, out, args.workers, args.shard_rows)
            print(row("Fashion-MNIST (IDX -> PNG)", res, out, args.workers), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"# kept {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
