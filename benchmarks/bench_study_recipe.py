"""Which SSL recipe lets *naive sequential* training beat random init on the LINEAR probe?

The Fashion-MNIST streaming study runs many (~40) streams on 2 CPU cores, so each stream's
training must be cheap (a few minutes), yet sequential training on the 3-segment ``class_random``
stream must end clearly above the random-init encoder on the linear probe (random convolutional
features are a strong baseline on Fashion-MNIST). This script measures candidate recipes in one
process, without Ray or DeepSpeed (the recipe, not the system, is under test):

* the stream plan of the base config (default ``configs/study_recipe_base.yaml``: protocol
  ``class_random``, 3 segments, no replay), each segment's images in plan order, optionally capped
  (``--max-images-per-segment``, like ``stream.max_images_per_segment``);
* segments trained in order, each with a fresh optimizer and per-segment schedule (as every
  segment's workers build them); the global batch is ``optim.batch_size x scaling.num_workers``
  drawn as epochs of shuffled segment images; steps per segment as the driver computes them
  (``optim.steps_per_segment``, else ``epochs_per_segment`` x full batches per epoch);
* at random init and after the last segment (``--eval-each-segment``: after every segment) the
  kNN probe (:func:`streamssl.evaluate.knn.knn_classify`, ``eval.knn_k`` / ``eval.knn_temperature``)
  and the linear probe (:func:`streamssl.evaluate.linear.linear_probe`, ``eval.linear_epochs``) on
  frozen backbone features of the same probe sets as the stream driver
  (:func:`streamssl.evaluate.after_segment.probe_rows`: 10,000 seeded train images as the probe's
  train set; scored on the validation split, ``data.val_fraction`` of the train split held back
  from every plan, or with ``--split test`` on the whole test split, which selection must not
  read; or on the first ``--test-images`` of either).

    .venv/bin/python benchmarks/bench_study_recipe.py \\
        --recipe demo= --recipe simclr05=ssl.method=simclr,ssl.temperature=0.5

Each ``--recipe NAME=k=v,k=v`` is a set of dotted config overrides on ``--config``; ``--seeds 0,1``
repeats every recipe with ``seed`` overridden (model init, batch order and the probe's train
subsample change; the stream plan does not). Training seconds are wall-clock seconds of the
training steps only (no data loading, no evaluation); "CPU s" is the process CPU time of the same
steps, the cost that survives a shared machine (at ``--threads 1``: ~the seconds on an idle core).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from streamssl.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "study_recipe_base.yaml"


def load_images(dataset_dir: str, ids: pa.Table, cfg) -> tuple[torch.Tensor, np.ndarray]:
    from streamssl.data.segments import read_rows_local

    data = read_rows_local(dataset_dir, ids, image_size=cfg.data.image_size, channels=cfg.data.channels)
    ok = data["valid"].astype(bool)
    return torch.from_numpy(np.ascontiguousarray(data["image"][ok])), np.asarray(data["label"])[ok]


def segment_ids(plan: pa.Table, t: int, cap: int | None) -> pa.Table:
    """Segment t's image ids in plan order, capped (as streamssl.train.driver.segment_rows)."""
    rows = plan.filter(pc.equal(plan["segment"], t)).sort_by("position")
    return (rows.slice(0, cap) if cap else rows).select(["image_id"])


def train_steps(model, aug, opt, sched, images: torch.Tensor, batch: int, steps: int, gen: torch.Generator,
                order: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``steps`` SSL steps on batches of ``images`` drawn as shuffled drop_last epochs (like the
    workers), continuing the epoch ``order`` left over from the last call; returns the rest of it
    and the last loss."""
    loss = float("nan")
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(len(images), generator=gen)
        idx, order = order[:batch], order[batch:]
        x = images[idx]
        out = model(aug(x), aug(x))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        model.on_after_step()
        loss = float(out["loss"].detach())
    return order, loss


@torch.no_grad()
def encode(backbone, images: torch.Tensor, transform, batch: int = 1000) -> np.ndarray:
    was = backbone.training
    backbone.eval()
    out = [backbone(transform(images[i : i + batch])) for i in range(0, len(images), batch)]
    backbone.train(was)
    return torch.cat(out).numpy()


def probes(backbone, cfg, tf, probe) -> dict[str, float]:
    from streamssl.evaluate.knn import knn_classify
    from streamssl.evaluate.linear import linear_probe

    (tr_x, tr_y), (te_x, te_y) = probe
    t0 = time.perf_counter()
    ftr, fte = encode(backbone, tr_x, tf), encode(backbone, te_x, tf)
    knn = knn_classify(ftr, tr_y, fte, te_y, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    lin = linear_probe(ftr, tr_y, fte, te_y, epochs=cfg.eval.linear_epochs)
    return {"knn": knn.accuracy, "linear": lin.accuracy, "linear_train": lin.train_accuracy,
            "eval_s": time.perf_counter() - t0}


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


_PROBE_CACHE: dict = {}
_INIT_CACHE: dict = {}


def probe_data(cfg, test_images: int | None, split: str = "val"):
    from streamssl.evaluate.after_segment import probe_sets

    key = (cfg.data.dataset_dir, cfg.seed, cfg.data.eval_split, cfg.eval.max_train_images,
           cfg.eval.max_test_images, test_images, split, cfg.data.val_fraction)
    if key not in _PROBE_CACHE:
        train_ids, test_ids, val_ids = probe_sets(cfg)
        if split == "val":  # selection reads the validation split, never the test split
            test_ids = val_ids
        if test_images:
            test_ids = test_ids.slice(0, test_images)
        _PROBE_CACHE[key] = (load_images(cfg.data.dataset_dir, train_ids.select(["image_id"]), cfg),
                             load_images(cfg.data.dataset_dir, test_ids.select(["image_id"]), cfg))
    return _PROBE_CACHE[key]


def run_recipe(name: str, overrides: list[str], args) -> dict:
    from streamssl.data.streams import load_plan, make_plan
    from streamssl.ssl import build_augment, build_method, model_init_seed
    from streamssl.ssl.augment import eval_transform
    from streamssl.train.schedule import lr_factor
    from streamssl.train.worker import build_optimizer

    extra = [f"data.dataset_dir={args.dataset}"]
    if args.max_images_per_segment:
        extra.append(f"stream.max_images_per_segment={args.max_images_per_segment}")
    cfg = load_config(args.config, [*extra, *overrides])
    if cfg.replay.size or cfg.regularization.method != "none" or cfg.strategy != "naive":
        print(f"[{name}] note: replay/regularization/strategy in the config are ignored (naive training)")
    meta = make_plan(cfg.data.dataset_dir, cfg.stream.protocol, cfg.stream.segments, cfg.stream.seed,
                     val_fraction=cfg.data.val_fraction)
    plan, _ = load_plan(meta["out_dir"])
    probe = probe_data(cfg, args.test_images, args.split)
    torch.manual_seed(model_init_seed(cfg.seed))  # the init segment 0 starts from
    model = build_method(cfg.ssl, in_channels=cfg.data.channels)
    aug = build_augment(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    tf = eval_transform(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)

    key = (digest(model.backbone), cfg.seed, args.test_images, cfg.ssl.augment)
    if key not in _INIT_CACHE:
        _INIT_CACHE[key] = probes(model.backbone, cfg, tf, probe)
    init = _INIT_CACHE[key]
    print(f"[{name}] random init kNN {init['knn']:.4f} linear {init['linear']:.4f}", flush=True)

    batch = cfg.optim.batch_size * cfg.scaling.num_workers
    gen = torch.Generator().manual_seed(cfg.seed)
    curve, t_train, cpu_train, step = [], 0.0, 0.0, 0
    loss = float("nan")
    for t in range(cfg.stream.segments):
        seg_x, _ = load_images(cfg.data.dataset_dir, segment_ids(plan, t, cfg.stream.max_images_per_segment), cfg)
        if cfg.optim.steps_per_segment:
            seg_steps = cfg.optim.steps_per_segment
        else:
            per_epoch = len(seg_x) // batch
            if per_epoch == 0:
                raise ValueError(f"segment {t}: {len(seg_x)} images < one batch of {batch}")
            seg_steps = max(1, int(np.ceil(per_epoch * cfg.optim.epochs_per_segment)))
        opt = build_optimizer([p for p in model.trainable_parameters() if p.requires_grad], cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, n=seg_steps: lr_factor(
            s, n, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
            decay_fraction=cfg.optim.decay_fraction))
        t0, c0 = time.perf_counter(), time.process_time()
        _, loss = train_steps(model, aug, opt, sched, seg_x, batch, seg_steps, gen, torch.empty(0, dtype=torch.long))
        step += seg_steps
        t_train += time.perf_counter() - t0
        cpu_train += time.process_time() - c0
        row = {"segment": t, "step": step, "steps": seg_steps, "images": len(seg_x), "loss": loss,
               "train_s": t_train}
        if args.eval_each_segment or t == cfg.stream.segments - 1:
            row.update(probes(model.backbone, cfg, tf, probe))
        curve.append(row)
        msg = f"[{name}] segment {t} ({len(seg_x)} imgs, {seg_steps} steps) loss {loss:.3f} train {t_train:.0f}s"
        if "knn" in row:
            msg += f" kNN {row['knn']:.4f} linear {row['linear']:.4f}"
        print(msg, flush=True)
    final = curve[-1]
    return {"recipe": name, "seed": cfg.seed, "overrides": overrides, "curve": curve, "train_s": t_train,
            "cpu_s": cpu_train, "steps": step, "batch": batch, "ssl": cfg.ssl.model_dump(),
            "images_per_s": step * batch / t_train,
            "init_knn": init["knn"], "init_linear": init["linear"],
            "final_knn": final["knn"], "final_linear": final["linear"],
            "final_linear_train": final["linear_train"], "loadavg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--dataset", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--max-images-per-segment", type=int, default=None)
    ap.add_argument("--test-images", type=int, default=None,
                    help="score on the first N images of the eval split (default: all of it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", choices=["val", "test"], default="val",
                    help="score on the validation split (default; what selection may read) or the test split")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds; each recipe runs once per seed")
    ap.add_argument("--eval-each-segment", action="store_true", help="probe after every segment, not only the last")
    ap.add_argument("--recipe", action="append", default=[], help="NAME=key=value,key=value")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    results = []
    for spec in args.recipe or ["base="]:
        name, _, rest = spec.partition("=")
        for seed in seeds:
            ov = [o for o in rest.split(",") if o] + ([f"seed={seed}"] if seed is not None else [])
            results.append(run_recipe(name, ov, args))
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2))
    print()
    print("| recipe | overrides | img/s | train s | CPU s | steps | kNN init | linear init | kNN final | linear final "
          "| kNN gain | linear gain |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['recipe']} | {' '.join(r['overrides']) or '-'} | {r['images_per_s']:.0f} | {r['train_s']:.0f} | "
              f"{r['cpu_s']:.0f} | {r['steps']} | {r['init_knn']:.4f} | {r['init_linear']:.4f} | "
              f"{r['final_knn']:.4f} | {r['final_linear']:.4f} | {r['final_knn'] - r['init_knn']:+.4f} | "
              f"{r['final_linear'] - r['init_linear']:+.4f} |")


if __name__ == "__main__":
    main()
