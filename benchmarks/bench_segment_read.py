"""Segment read throughput: ``read_segments(...).iter_batches()`` vs a plain pyarrow + PIL loop.

One class_random segment (K=5, seed 0: 2 classes, 12,000 images) of real Fashion-MNIST, read end
to end both ways, each repeated ``--repeats`` times in the same process; the median images/s and
the ratio are printed as JSON (and as a Markdown row). Both produce the same thing: the segment's
rows in plan order as a uint8 (N, 1, 28, 28) array.

* ``ray``: build the Dataset (index join, read-task descriptors) and drain ``iter_batches``;
  decoding runs in Ray tasks (``num_cpus`` of them at once).
* ``plain``: one process: ``pyarrow.parquet.read_table`` of each needed shard (once), ``take``
  the rows in plan order, ``PIL.Image.open`` + ``np.asarray`` for each image.

The breakdown of the plain loop (Parquet read vs PNG decode) and the Ray run's per-operator
stats say where the time goes.

    .venv/bin/python benchmarks/bench_segment_read.py                 # ingests to a temp dir
    .venv/bin/python benchmarks/bench_segment_read.py --dataset data/fashion-mnist
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamssl.data import layout  # noqa: E402


def ensure_dataset(path: str | None) -> str:
    """Use ``path`` if it holds a dataset; else ingest Fashion-MNIST there (or in a temp dir)."""
    from streamssl.data.ingest import ingest

    if path and os.path.isfile(os.path.join(path, layout.DATASET_FILE)):
        return path
    out = path or os.path.join(tempfile.mkdtemp(prefix="bench-seg-"), "fashion-mnist")
    t = time.perf_counter()
    ingest("fashion-mnist", out)
    print(f"ingested Fashion-MNIST to {out} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return out


def plain_read(dataset: str, rows: pa.Table) -> tuple[np.ndarray, float, float]:
    """The baseline; returns (images, parquet seconds, decode seconds)."""
    from PIL import Image

    t0 = time.perf_counter()
    tables: dict[str, pa.Table] = {}
    shards = rows["shard"].to_pylist()
    for s in dict.fromkeys(shards):
        tables[s] = pq.read_table(os.path.join(dataset, s), columns=["image_id", "image"])
    # Plan order is a few long runs per shard: take each run's rows from its shard table.
    datas: list[bytes] = []
    row_idx = rows["row"].to_numpy()
    start = 0
    for end in [*np.flatnonzero(np.asarray(shards[1:]) != np.asarray(shards[:-1])) + 1, len(shards)]:
        col = tables[shards[start]]["image"].take(pa.array(row_idx[start:end]))
        datas.extend(col.to_pylist())
        start = end
    t1 = time.perf_counter()
    out = np.empty((len(datas), 1, 28, 28), dtype=np.uint8)
    for i, d in enumerate(datas):
        out[i, 0] = np.asarray(Image.open(io.BytesIO(d)).convert("L"))
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


def ray_read(dataset: str, plan: pa.Table, segment: int, batch_size: int) -> tuple[np.ndarray, list[str], object]:
    from streamssl.data.segments import read_segments

    ds = read_segments(dataset, plan, segment, image_size=28, channels=1)
    imgs, ids = [], []
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        imgs.append(b["image"])
        ids.extend(b["image_id"].tolist())
    return np.concatenate(imgs), ids, ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=None, help="ingested Fashion-MNIST (ingested here if missing)")
    ap.add_argument("--segments", type=int, default=5)
    ap.add_argument("--segment", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    a = ap.parse_args()

    import ray

    from streamssl.data.segments import locate
    from streamssl.data.plan import load_plan
    from streamssl.data.protocols import make_plan

    dataset = ensure_dataset(a.dataset)
    plan_dir = os.path.join(tempfile.mkdtemp(prefix="bench-plan-"), "plan")
    meta = make_plan(dataset, "class_random", a.segments, 0, out_dir=plan_dir)
    plan, _ = load_plan(plan_dir)
    seg_rows = plan.filter(pc.equal(plan["segment"], a.segment)).sort_by("position")
    located = locate(dataset, seg_rows.select(["image_id", "segment"]))
    n = located.num_rows
    seg_meta = meta["segments"][a.segment]

    ray.init(num_cpus=a.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False

    ray_s, plain_s, pq_s, dec_s = [], [], [], []
    ref_ids = located["image_id"].to_pylist()
    stats = ""
    for r in range(a.repeats):
        t = time.perf_counter()
        imgs_r, ids_r, ds = ray_read(dataset, plan, a.segment, a.batch_size)
        ray_s.append(time.perf_counter() - t)
        stats = ds.stats()
        t = time.perf_counter()
        imgs_p, tp, td = plain_read(dataset, located)
        plain_s.append(time.perf_counter() - t)
        pq_s.append(tp)
        dec_s.append(td)
        assert ids_r == ref_ids, "Ray read lost plan order"
        assert np.array_equal(imgs_r, imgs_p), "the two reads disagree"
        print(f"repeat {r}: ray {ray_s[-1]:.2f} s, plain {plain_s[-1]:.2f} s", file=sys.stderr)

    # Setup cost on the driver alone (index join + task descriptors), without executing.
    from streamssl.data.segments import plan_read_tasks, rows_per_task_for

    t = time.perf_counter()
    tasks = plan_read_tasks(locate(dataset, seg_rows.select(["image_id", "segment"])), rows_per_task_for(28, 1))
    setup_s = time.perf_counter() - t
    ray.shutdown()

    med_r, med_p = statistics.median(ray_s), statistics.median(plain_s)
    result = {
        "images": n,
        "segment": {"index": a.segment, "classes": seg_meta.get("classes"), "shards": seg_meta["shards"],
                    "shard_runs": seg_meta["shard_runs"], "read_tasks": len(tasks)},
        "ray_s": [round(x, 3) for x in ray_s],
        "plain_s": [round(x, 3) for x in plain_s],
        "ray_images_per_s": round(n / med_r),
        "plain_images_per_s": round(n / med_p),
        "ratio_ray_over_plain": round(med_p / med_r, 2),
        "plain_breakdown_s": {"parquet": round(statistics.median(pq_s), 3), "decode": round(statistics.median(dec_s), 3)},
        "ray_driver_setup_s": round(setup_s, 3),
        "num_cpus": a.num_cpus,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "pyarrow": pa.__version__,
    }
    print(json.dumps(result, indent=2))
    print("\nlast Ray run's stats:\n" + str(stats), file=sys.stderr)
    print(f"\n| {n} | {med_r:.2f} | {n / med_r:,.0f} | {med_p:.2f} | {n / med_p:,.0f} | {med_p / med_r:.2f} |")


if __name__ == "__main__":
    main()
