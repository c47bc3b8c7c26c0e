"""Learning curve of an SSL recipe: kNN and linear accuracy against images seen, on validation.

How many augmented images must a recipe see before its encoder beats raw pixels? This script
answers it for one or more recipes in one process each (no Ray, no DeepSpeed: the recipe is under
test, not the system), scored on the **validation split** (:mod:`streamssl.data.validation`, the
images every stream plan holds back), never on the test split:

* the pool is the train split minus validation (what a stream plan cuts into segments); it is
  trained i.i.d. in shuffled epochs -- the joint-training ceiling of a stream, not a stream;
* global batch ``optim.batch_size x scaling.num_workers``, the config's optimizer, warmup then a
  constant LR (the stable part of the workers' warmup-stable-decay schedule), so each point is
  what a run stopped there reaches *before* its decay;
* ``--decay-over N`` instead runs one whole warmup-stable-decay schedule over N images (its
  last ``optim.decay_fraction`` decays), as a single segment of that many images would;
* every ``--eval-every`` images: the project's kNN (:func:`streamssl.evaluate.knn.knn_classify`,
  ``eval.knn_k``, ``eval.knn_temperature``) and linear probe
  (:func:`streamssl.evaluate.linear.linear_probe`, ``eval.linear_epochs`` L-BFGS iterations) on
  frozen backbone features; the probe's train set is a fixed seeded draw of ``--probe-train``
  pool images (the same for every recipe and seed), the score set is the whole validation split;
* reference lines, on the same probe sets: raw pixels (flattened, /255) and the recipe's random
  init.

    .venv/bin/python benchmarks/bench_learning_curve.py --threads 1 --images 400000 \\
        --recipe study=ssl.method=simclr,ssl.temperature=0.5,optim.lr=0.3 --out curve.json

``--protocol P --segments K`` instead trains *naive sequential* SSL over a stream plan of the pool
(:func:`streamssl.data.protocols.make_plan` with the same validation fraction): segments in order,
each ``optim.epochs_per_segment`` epochs of its own images with a fresh optimizer and its own
warmup-stable-decay schedule, as the workers run them; a point after every segment.

``--recipe NAME=k=v,k=v`` are dotted overrides on ``--config`` (default: the study's base recipe
file). Several recipes run one after another; run several processes for a side-by-side run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_study_recipe import DEFAULT_CONFIG, encode, load_images, train_steps  # noqa: E402

from streamssl.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBE_SEED = 12345


def pools(dataset_dir: str, fraction: float, probe_train: int, cfg):
    """(training pool images, probe-train (x, y), validation (x, y)) as uint8 tensors."""
    from streamssl.data import layout
    from streamssl.data.validation import split_train

    index = layout.read_index(dataset_dir, ["image_id", "label", "split"]).select(["image_id", "label", "split"])
    train = index.filter(pc.equal(index["split"], "train"))
    train = train.take(pc.sort_indices(train, [("image_id", "ascending")]))
    pool, val = split_train(train, fraction)
    rng = np.random.default_rng(PROBE_SEED)
    probe = pool.take(np.sort(rng.choice(pool.num_rows, probe_train, replace=False)))
    return (load_images(dataset_dir, pool.select(["image_id"]), cfg)[0],
            load_images(dataset_dir, probe.select(["image_id"]), cfg),
            load_images(dataset_dir, val.select(["image_id"]), cfg))


def score(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray, cfg) -> dict[str, float]:
    from streamssl.evaluate.knn import knn_classify
    from streamssl.evaluate.linear import linear_probe

    knn = knn_classify(ftr, ytr, fte, yte, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    lin = linear_probe(ftr, ytr, fte, yte, epochs=cfg.eval.linear_epochs)
    return {"knn": knn.accuracy, "linear": lin.accuracy}


def pixels(x: torch.Tensor) -> np.ndarray:
    return (x.reshape(len(x), -1).float() / 255.0).numpy()


def run_recipe(name: str, overrides: list[str], args, data) -> dict:
    from streamssl.ssl import build_augment, build_method, model_init_seed
    from streamssl.ssl.augment import eval_transform
    from streamssl.train.schedule import lr_factor
    from streamssl.train.worker import build_optimizer

    cfg = load_config(args.config, [f"data.dataset_dir={args.dataset}", *overrides])
    pool, (ptr_x, ptr_y), (val_x, val_y) = data
    torch.manual_seed(model_init_seed(cfg.seed))
    model = build_method(cfg.ssl, in_channels=cfg.data.channels)
    aug = build_augment(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    tf = eval_transform(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    batch = cfg.optim.batch_size * cfg.scaling.num_workers
    opt = build_optimizer([p for p in model.trainable_parameters() if p.requires_grad], cfg)
    # No decay by default ("stable" forever after warmup); --decay-over N: one warmup-stable-decay
    # schedule over N images, as one segment of N images would run it.
    horizon = -(-args.decay_over // batch) if args.decay_over else 10**9
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, horizon, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
        decay_fraction=cfg.optim.decay_fraction))
    gen = torch.Generator().manual_seed(cfg.seed)

    def point(seen: int, train_s: float, loss: float) -> dict:
        t0 = time.perf_counter()
        row = {"images": seen, "epochs": seen / len(pool), "train_s": train_s, "loss": loss,
               **score(encode(model.backbone, ptr_x, tf), ptr_y, encode(model.backbone, val_x, tf), val_y, cfg)}
        row["eval_s"] = time.perf_counter() - t0
        print(f"[{name}] {seen:>8} images ({row['epochs']:.2f} ep) {train_s:6.0f}s loss {loss:.3f} "
              f"kNN {row['knn']:.4f} linear {row['linear']:.4f}", flush=True)
        return row

    curve = [point(0, 0.0, float("nan"))]
    order = torch.empty(0, dtype=torch.long)
    seen, train_s, cpu_s, next_eval, loss = 0, 0.0, 0.0, args.eval_every, float("nan")
    while seen < args.images:
        t0, c0 = time.perf_counter(), time.process_time()
        n = -(-(min(next_eval, args.images) - seen) // batch)
        order, loss = train_steps(model, aug, opt, sched, pool, batch, n, gen, order)
        seen += n * batch
        train_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        curve.append(point(seen, train_s, loss))
        next_eval += args.eval_every
        if args.out:
            _write(args.out, name, overrides, cfg, batch, curve, cpu_s, data)
    return {"recipe": name, "overrides": overrides, "curve": curve, "cpu_s": cpu_s,
            "images_per_s": seen / max(train_s, 1e-9)}


def run_stream(name: str, overrides: list[str], args, data) -> dict:
    """Naive sequential training over the plan's segments (see the module docstring)."""
    from streamssl.data.plan import load_plan
    from streamssl.data.protocols import make_plan
    from streamssl.ssl import build_augment, build_method, model_init_seed
    from streamssl.ssl.augment import eval_transform
    from streamssl.train.schedule import lr_factor
    from streamssl.train.worker import build_optimizer

    cfg = load_config(args.config, [f"data.dataset_dir={args.dataset}", *overrides])
    _, (ptr_x, ptr_y), (val_x, val_y) = data
    meta = make_plan(args.dataset, args.protocol, args.segments, cfg.stream.seed, val_fraction=args.val_fraction)
    plan, _ = load_plan(meta["out_dir"])
    torch.manual_seed(model_init_seed(cfg.seed))
    model = build_method(cfg.ssl, in_channels=cfg.data.channels)
    aug = build_augment(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    tf = eval_transform(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    batch = cfg.optim.batch_size * cfg.scaling.num_workers
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = [{"segment": -1, "images": 0, "train_s": 0.0,
              **score(encode(model.backbone, ptr_x, tf), ptr_y, encode(model.backbone, val_x, tf), val_y, cfg)}]
    print(f"[{name}] random init kNN {curve[0]['knn']:.4f} linear {curve[0]['linear']:.4f}", flush=True)
    seen, train_s, cpu_s = 0, 0.0, 0.0
    for t in range(args.segments):
        ids = plan.filter(pc.equal(plan["segment"], t)).sort_by("position").select(["image_id"])
        seg_x, _ = load_images(args.dataset, ids, cfg)
        steps = max(1, int(np.ceil(len(seg_x) // batch * cfg.optim.epochs_per_segment)))
        opt = build_optimizer([p for p in model.trainable_parameters() if p.requires_grad], cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, n=steps: lr_factor(
            s, n, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
            decay_fraction=cfg.optim.decay_fraction))
        t0, c0 = time.perf_counter(), time.process_time()
        _, loss = train_steps(model, aug, opt, sched, seg_x, batch, steps, gen, torch.empty(0, dtype=torch.long))
        seen += steps * batch
        train_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        row = {"segment": t, "images": seen, "segment_images": len(seg_x), "steps": steps, "train_s": train_s,
               "loss": loss,
               **score(encode(model.backbone, ptr_x, tf), ptr_y, encode(model.backbone, val_x, tf), val_y, cfg)}
        curve.append(row)
        print(f"[{name}] segment {t} ({len(seg_x)} images x {cfg.optim.epochs_per_segment} ep, {steps} steps) "
              f"{seen} seen {train_s:.0f}s kNN {row['knn']:.4f} linear {row['linear']:.4f}", flush=True)
        if args.out:
            _write(args.out, name, overrides, cfg, batch, curve, cpu_s, data,
                   stream={"protocol": args.protocol, "segments": args.segments})
    return {"recipe": name, "curve": curve}


def _write(out: str, name: str, overrides, cfg, batch, curve, cpu_s, data, stream: dict | None = None) -> None:
    p = Path(out)
    doc = json.loads(p.read_text()) if p.exists() else {}
    doc.setdefault("recipes", {})[name] = {"overrides": overrides, "batch": batch, "ssl": cfg.ssl.model_dump(),
                                           "optim": cfg.optim.model_dump(), "curve": curve, "cpu_s": cpu_s,
                                           "stream": stream}
    p.write_text(json.dumps(doc, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--dataset", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--probe-train", type=int, default=10000)
    ap.add_argument("--images", type=int, default=300000, help="images to train on per recipe")
    ap.add_argument("--eval-every", type=int, default=25000)
    ap.add_argument("--decay-over", type=int, default=None, help="one WSD schedule over this many images")
    ap.add_argument("--protocol", default=None, help="train naive sequential over this stream protocol")
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", action="append", default=[], help="NAME=key=value,key=value")
    ap.add_argument("--out", default=None, help="JSON results (rewritten after every point)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(args.config, [f"data.dataset_dir={args.dataset}"])
    data = pools(args.dataset, args.val_fraction, args.probe_train, base)
    (ptr_x, ptr_y), (val_x, val_y) = data[1], data[2]
    ref = score(pixels(ptr_x), ptr_y, pixels(val_x), val_y, base)
    print(f"pool {len(data[0])} images, probe train {len(ptr_x)}, validation {len(val_x)}; "
          f"raw pixels kNN {ref['knn']:.4f} linear {ref['linear']:.4f}", flush=True)
    if args.out:
        p = Path(args.out)
        doc = json.loads(p.read_text()) if p.exists() else {}
        doc.update({"raw_pixels": ref, "pool": len(data[0]), "probe_train": len(ptr_x), "validation": len(val_x),
                    "val_fraction": args.val_fraction, "threads": args.threads, "machine": os.uname().machine,
                    "cpus": os.cpu_count()})
        p.write_text(json.dumps(doc, indent=1))
    for spec in args.recipe or ["base="]:
        name, _, rest = spec.partition("=")
        run = run_stream if args.protocol else run_recipe
        run(name, [o for o in rest.split(",") if o], args, data)


if __name__ == "__main__":
    main()
