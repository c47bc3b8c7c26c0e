"""The marginal cost of a segment: one Ray Train run per stream vs one per segment, side by side.

Runs the same stream with 2 and with 4 segments (same images per segment) for each execution
shape, as a user would (``streamssl train`` in a fresh process, local Ray, no evaluation or
tracking):

* ``per-stream``: ``scaling.segments_per_fit`` unset: one ``TorchTrainer.fit()`` trains every
  segment (one worker group, process group, DeepSpeed import; a new engine per segment);
* ``per-segment``: ``scaling.segments_per_fit=1``: a new ``fit()`` per segment, as before.

Marginal cost of a segment = ((stream wall of 4) - (stream wall of 2) - (loop time of the two
extra segments)) / 2: the fixed cost every further segment adds on top of its own training loop.
Also printed: the loop's share of the stream's wall time, and each segment's own overhead as the
driver records it (``time/overhead_s``: the workers' wall time on the segment minus its loop and
importance pass), averaged over segments 1.. of the 4-segment stream; on a shared machine whose
load changes between runs this is the steadier figure, since it is measured within one run. Runs
are interleaved (2/stream, 2/segment, 4/stream, 4/segment) so a noisy machine hits both shapes
alike. Run:

    .venv/bin/python benchmarks/bench_segment_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ["optim.epochs_per_segment=2", "eval.enabled=false", "tracking.enabled=false", "replay.size=0"]
SHAPES = {"per-stream": [], "per-segment": ["scaling.segments_per_fit=1"]}


def run_stream(config: str, segments: int, images: int, shape: str, extra: list[str], out: Path) -> dict:
    run_dir = out / f"{shape}-k{segments}"
    cmd = [sys.executable, "-m", "streamssl.cli", "train", config, "--run-dir", str(run_dir),
           f"stream.segments={segments}", f"stream.max_images_per_segment={images}", *BASE, *SHAPES[shape], *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    doc = json.loads((run_dir / "results.json").read_text())
    loops = [s["metrics"]["time/train_loop_s"] + s["metrics"].get("time/importance_s", 0.0) for s in doc["segments"]]
    overheads = [s["metrics"]["time/overhead_s"] for s in doc["segments"]]
    return {"process_wall_s": wall, "stream_wall_s": doc["wall_s"], "loop_s": loops, "overhead_s": overheads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist_class_incremental.yaml"))
    p.add_argument("--images", type=int, default=3072, help="images per segment")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    a = p.parse_args()
    runs: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as d:
        for k in (2, 4):
            for shape in SHAPES:
                runs[shape, k] = r = run_stream(a.config, k, a.images, shape, a.overrides, Path(d))
                print(f"{shape:12s} k={k}: stream wall {r['stream_wall_s']:.1f}s, process {r['process_wall_s']:.1f}s, "
                      f"loops {[round(x, 1) for x in r['loop_s']]}, overheads {[round(x, 1) for x in r['overhead_s']]}",
                      flush=True)
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{a.images} images/segment, {' '.join(BASE + a.overrides)}")
    print("| shape | wall 2 seg (s) | wall 4 seg (s) | marginal cost / segment (s) | overhead / segment, segments 1-3 (s) "
          "| first segment overhead (s) | loop share of wall (4 seg) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        two, four = runs[shape, 2], runs[shape, 4]
        extra_loops = sum(four["loop_s"][2:])
        marginal = (four["stream_wall_s"] - two["stream_wall_s"] - extra_loops) / 2
        share = sum(four["loop_s"]) / four["stream_wall_s"]
        later = four["overhead_s"][1:]
        print(f"| {shape} | {two['stream_wall_s']:.1f} | {four['stream_wall_s']:.1f} | {marginal:.1f} | "
              f"{sum(later) / len(later):.1f} | {four['overhead_s'][0]:.1f} | {share:.0%} |")


if __name__ == "__main__":
    main()
