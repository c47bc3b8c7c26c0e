"""Evaluation cost: frozen-feature extraction vs the training forward pass, side by side.

What the driver pays after every segment is dominated by encoding the probe sets (10k train
subsample + the 10k test split) with :func:`streamssl.evaluate.features.extract_features`:
Ray Data reads and decodes the images, an actor pool (one actor, 1 CPU) runs the encoder. This
script measures that on the real Fashion-MNIST test split with the default config's encoder
(``small_cnn`` width 32, random init: weights do not change the cost), next to the training
forward pass alone: the default SSL method (MoCo v2) in train mode, two augmented views of a batch
of the same size, autograd on as in training, no backward -- in this process, on the same images
already in memory.

Rows (images/s, one image = one input image; median over ``--repeats``):

* ``ray_extract``: ``extract_features(encoder, read_split(test), ...)`` end to end -- read +
  PNG decode in Ray tasks, actor start, encode, collect on the driver. What evaluation costs.
  The same call on the first ``--batch-size`` test rows (one batch) measures the fixed cost per
  call (actor pool start, pipeline start); ``ray_extract_steady`` is the rate after it,
  ``(N - n1) / (t_N - t_1)``.
* ``ray_decode_only``: the same Ray dataset drained without encoding (read + decode alone).
* ``local_extract_{1,N}t``: ``extract_features_local`` on the in-memory uint8 array, 1 thread (what
  the 1-CPU actor gets) and all threads: the encoder's own inference cost.
* ``train_forward_{1,N}t``: two views with ``build_augment`` + ``method(v1, v2)`` over
  ``--forward-batches`` batches after one warm-up batch; the augment share is reported too.

The machine is shared: the load average before and after each repeat is recorded with the numbers.

    .venv/bin/python benchmarks/bench_eval_cost.py --dataset data/fashion-mnist   # ingests if missing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamssl.config import load_config  # noqa: E402
from streamssl.data import layout  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "fashion_mnist_class_incremental.yaml"


def ensure_dataset(path: str | None) -> str:
    """Use ``path`` if it holds a dataset; else ingest Fashion-MNIST there (or in a temp dir)."""
    from streamssl.data.ingest import ingest

    if path and os.path.isfile(os.path.join(path, layout.DATASET_FILE)):
        return path
    out = path or os.path.join(tempfile.mkdtemp(prefix="bench-eval-"), "fashion-mnist")
    t = time.perf_counter()
    ingest("fashion-mnist", out)
    print(f"ingested Fashion-MNIST to {out} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return out


def ray_extract(encoder: torch.nn.Module, transform: torch.nn.Module, dataset: str, cfg, batch_size: int,
                first: int | None = None) -> tuple[float, int, int]:
    """(seconds, images, feature dim) of one extract_features over the test split (or its first rows)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from streamssl.data.segments import read_rows, read_split
    from streamssl.evaluate.features import extract_features

    t = time.perf_counter()
    size, ch = cfg.data.image_size, cfg.data.channels
    if first is None:
        ds = read_split(dataset, "test", image_size=size, channels=ch)
    else:
        index = pq.read_table(os.path.join(dataset, layout.INDEX_FILE), columns=["image_id", "split"])
        ids = index.filter(pc.equal(index["split"], "test")).select(["image_id"]).slice(0, first)
        ds = read_rows(dataset, ids, image_size=size, channels=ch, order="storage")
    fs = extract_features(encoder, ds, transform=transform, batch_size=batch_size, use_gpu=False)
    return time.perf_counter() - t, len(fs), fs.features.shape[1]


def ray_decode_only(dataset: str, cfg, batch_size: int) -> tuple[float, int]:
    from streamssl.data.segments import read_split

    t = time.perf_counter()
    ds = read_split(dataset, "test", image_size=cfg.data.image_size, channels=cfg.data.channels)
    n = sum(len(b["label"]) for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    return time.perf_counter() - t, n


def local_extract(encoder: torch.nn.Module, transform: torch.nn.Module, images: np.ndarray, batch_size: int,
                  threads: int) -> float:
    from streamssl.evaluate.features import extract_features_local

    torch.set_num_threads(threads)
    extract_features_local(encoder, images[: 2 * batch_size], None, transform, batch_size)  # warm-up
    t = time.perf_counter()
    extract_features_local(encoder, images, None, transform, batch_size)
    return time.perf_counter() - t


def train_forward(cfg, images: np.ndarray, batch_size: int, threads: int, n_batches: int, warmup: int = 1
                  ) -> dict[str, float]:
    """Seconds for augment (two views) and for the method's forward over all ``images``."""
    from streamssl.ssl import build_augment, build_method

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    method = build_method(cfg.ssl, in_channels=cfg.data.channels).train()
    augment = build_augment(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    n_batches = min(n_batches, len(images) // batch_size)
    aug_s = fwd_s = 0.0
    for b in range(warmup + n_batches):
        x = x_all[(b % n_batches) * batch_size:(b % n_batches + 1) * batch_size]
        t0 = time.perf_counter()
        v1, v2 = augment(x), augment(x)
        t1 = time.perf_counter()
        out = method(v1, v2)  # autograd on, as in training; no backward
        out["loss"].item()
        t2 = time.perf_counter()
        del out
        if b >= warmup:
            aug_s += t1 - t0
            fwd_s += t2 - t1
    return {"images": n_batches * batch_size, "augment_s": aug_s, "forward_s": fwd_s, "total_s": aug_s + fwd_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=None, help="ingested Fashion-MNIST (ingested here if missing)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--batch-size", type=int, default=512, help="extraction batch = training-forward batch")
    ap.add_argument("--forward-batches", type=int, default=6, help="timed training-forward batches per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=2)
    a = ap.parse_args()

    import ray

    from streamssl.data.segments import read_split
    from streamssl.ssl import build_method
    from streamssl.ssl.augment import eval_transform

    dataset = ensure_dataset(a.dataset)
    cfg = load_config(a.config, [f"data.dataset_dir={dataset}"])
    torch.manual_seed(0)
    encoder = build_method(cfg.ssl, in_channels=cfg.data.channels).backbone.eval()
    transform = eval_transform(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    all_threads = torch.get_num_threads()

    ray.init(num_cpus=a.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False

    # The test split in memory (through Ray once; checked to be the same rows the extraction sees).
    ds = read_split(dataset, "test", image_size=cfg.data.image_size, channels=cfg.data.channels)
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape[0] == 10_000 and all(b["valid"].all() for b in batches)

    threads = sorted({1, all_threads})
    rows: dict[str, list[float]] = {"ray_extract": [], "ray_extract_steady": [], "ray_decode_only": []}
    fixed_s: list[float] = []
    load: list[tuple[float, float]] = []
    rows.update({f"local_extract_{th}t": [] for th in threads})
    rows.update({f"train_forward_{th}t": [] for th in threads})
    parts: dict[str, list[dict[str, float]]] = {f"train_forward_{th}t": [] for th in threads}
    feat_dim = 0
    for r in range(a.repeats):
        load_before = os.getloadavg()[0]
        torch.set_num_threads(all_threads)
        s1, n1, _ = ray_extract(encoder, transform, dataset, cfg, a.batch_size, first=a.batch_size)
        s, n, feat_dim = ray_extract(encoder, transform, dataset, cfg, a.batch_size)
        assert n == len(images) and n1 == a.batch_size
        rows["ray_extract"].append(n / s)
        rows["ray_extract_steady"].append((n - n1) / max(s - s1, 1e-9))
        fixed_s.append(s1)
        s, n = ray_decode_only(dataset, cfg, a.batch_size)
        rows["ray_decode_only"].append(n / s)
        for th in threads:
            rows[f"local_extract_{th}t"].append(len(images) / local_extract(encoder, transform, images,
                                                                              a.batch_size, th))
            tf = train_forward(cfg, images, a.batch_size, th, a.forward_batches)
            parts[f"train_forward_{th}t"].append(tf)
            rows[f"train_forward_{th}t"].append(tf["images"] / tf["total_s"])
        torch.set_num_threads(all_threads)
        load.append((round(load_before, 2), round(os.getloadavg()[0], 2)))
        print(f"repeat {r} (load {load[-1]}): ray_extract one batch {s1:.2f} s, "
              + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rows.items()), file=sys.stderr)
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in rows.items()}
    fwd_split = {k: {"augment_share": statistics.median(p["augment_s"] / p["total_s"] for p in v),
                     "forward_only_images_per_s": statistics.median(p["images"] / p["forward_s"] for p in v)}
                 for k, v in parts.items()}
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__, "torch_threads": all_threads, "ray_num_cpus": a.num_cpus},
        "config": {"method": cfg.ssl.method, "backbone": cfg.ssl.backbone, "width": cfg.ssl.width,
                   "image_size": cfg.data.image_size, "feature_dim": feat_dim, "batch_size": a.batch_size},
        "images": int(len(images)),
        "load_avg_1min_before_after": load,
        "ray_extract_one_batch_s": [round(x, 2) for x in fixed_s],
        "median_ray_extract_one_batch_s": round(statistics.median(fixed_s), 2),
        "images_per_s": {k: [round(x, 1) for x in v] for k, v in rows.items()},
        "median_images_per_s": {k: round(v, 1) for k, v in med.items()},
        "train_forward_breakdown": fwd_split,
        "ratio_ray_extract_vs_train_forward_1t": med["ray_extract"] / med["train_forward_1t"],
        f"ratio_ray_extract_vs_train_forward_{all_threads}t": med["ray_extract"] / med[f"train_forward_{all_threads}t"],
    }
    print(json.dumps(result, indent=2))
    print()
    ref = med["train_forward_1t"]
    print("| path | threads | images/s (median) | vs training forward, 1 thread |")
    print("|---|---:|---:|---:|")
    labels = {
        "ray_extract": ("`extract_features` (Ray Data read+decode -> 1-actor pool), end to end", "1 actor"),
        "ray_extract_steady": ("same, after its fixed cost per call (rate past the first batch)", "1 actor"),
        "ray_decode_only": ("Ray Data read+decode only (no encoder)", f"{a.num_cpus} CPUs"),
    }
    for th in threads:
        labels[f"local_extract_{th}t"] = ("`extract_features_local`, in-memory uint8, encoder only", str(th))
    for th in threads:
        labels[f"train_forward_{th}t"] = (f"training forward: 2 augmented views + {cfg.ssl.method} forward, "
                                          "no backward", str(th))
    for k, (label, th) in labels.items():
        print(f"| {label} | {th} | {med[k]:,.0f} | {med[k] / ref:.2f} |")


if __name__ == "__main__":
    main()
