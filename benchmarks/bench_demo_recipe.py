"""Which SSL recipe can the demo afford? kNN accuracy per training step, recipes side by side.

The demo must beat the random-init encoder's kNN accuracy on Fashion-MNIST within ~15 minutes
on 2 CPU cores, i.e. a few hundred steps in all. This script answers "does recipe X learn fast
enough?" without Ray or DeepSpeed in the way (the recipe, not the system, is under test): one
process, the demo's class-incremental stream (the same plan the demo trains on), segments in
order, a uniform replay buffer mixed into every batch like the replay plugin, and the demo's kNN
probe (10,000 train features as the bank, k=20, T=0.07) on the first images of the validation split after every
segment (the test split is for final tables only).

    .venv/bin/python benchmarks/bench_demo_recipe.py --steps-per-segment 60 \\
        --recipe base= --recipe simclr=ssl.method=simclr,ssl.temperature=0.5

Each ``--recipe NAME=k=v,k=v`` is a set of config overrides on the default demo config; a recipe's
own ``optim.steps_per_segment`` overrides ``--steps-per-segment`` (e.g. more steps for a smaller
model in the same time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from streamssl.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "fashion_mnist_class_incremental.yaml"


def load_images(dataset_dir: str, ids, cfg) -> tuple[torch.Tensor, np.ndarray]:
    from streamssl.data.segments import read_rows_local

    data = read_rows_local(dataset_dir, ids, image_size=cfg.data.image_size, channels=cfg.data.channels)
    ok = data["valid"].astype(bool)
    return torch.from_numpy(np.ascontiguousarray(data["image"][ok])), np.asarray(data["label"])[ok]


@torch.no_grad()
def encode(model, images: torch.Tensor, transform, batch: int = 1000) -> np.ndarray:
    model.eval()
    out = [model.backbone(transform(images[i : i + batch])) for i in range(0, len(images), batch)]
    model.train()
    return torch.cat(out).numpy()


def run_recipe(name: str, overrides: list[str], args, probe) -> dict:
    from streamssl.data.plan import load_plan
    from streamssl.data.protocols import make_plan
    from streamssl.evaluate.knn import knn_classify
    from streamssl.ssl import build_augment, build_method, model_init_seed
    from streamssl.ssl.augment import eval_transform
    from streamssl.train.schedule import lr_factor
    from streamssl.train.worker import build_optimizer

    cfg = load_config(DEFAULT_CONFIG, [f"data.dataset_dir={args.dataset}", *overrides])
    meta = make_plan(cfg.data.dataset_dir, cfg.stream.protocol, cfg.stream.segments, cfg.stream.seed,
                     val_fraction=cfg.data.val_fraction)
    plan, _ = load_plan(meta["out_dir"])
    torch.manual_seed(model_init_seed(cfg.seed))  # the init segment 0 starts from
    model = build_method(cfg.ssl, in_channels=cfg.data.channels)
    aug = build_augment(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    tf = eval_transform(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    (bank_x, bank_y), (test_x, test_y) = probe

    def knn() -> float:
        return knn_classify(encode(model, bank_x, tf), bank_y, encode(model, test_x, tf), test_y,
                            k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature).accuracy

    batch = cfg.optim.batch_size * cfg.scaling.num_workers
    n_replay = int(round(batch * cfg.replay.ratio)) if cfg.replay.size else 0
    rng = np.random.default_rng(cfg.seed)
    replay: list[torch.Tensor] = []  # uniform (reservoir) sample of past segments' images
    seen = 0
    curve = [{"segment": -1, "step": 0, "knn": knn()}]
    print(f"[{name}] random init kNN {curve[0]['knn']:.4f}", flush=True)
    t_train = 0.0
    step = 0
    for t in range(cfg.stream.segments):
        seg_ids = plan.filter(pc.equal(plan["segment"], t)).select(["image_id"])
        seg_x, _ = load_images(cfg.data.dataset_dir, seg_ids, cfg)
        seg_steps = cfg.optim.steps_per_segment or args.steps_per_segment
        # A fresh optimizer + per-segment schedule, as each segment's worker builds them.
        opt = build_optimizer([p for p in model.trainable_parameters() if p.requires_grad], cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
            s, seg_steps, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
            decay_fraction=cfg.optim.decay_fraction))
        t0 = time.perf_counter()
        for _ in range(seg_steps):
            x = seg_x[torch.from_numpy(rng.integers(0, len(seg_x), batch - (n_replay if replay else 0)))]
            if replay:
                pick = rng.integers(0, len(replay), n_replay)
                x = torch.cat([x, torch.stack([replay[i] for i in pick])])
            out = model(aug(x), aug(x))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
            model.on_after_step()
            step += 1
        t_train += time.perf_counter() - t0
        if cfg.replay.size:  # reservoir over the segment's images
            for img in seg_x:
                seen += 1
                if len(replay) < cfg.replay.size:
                    replay.append(img)
                else:
                    j = rng.integers(0, seen)
                    if j < cfg.replay.size:
                        replay[j] = img
        acc = knn()
        curve.append({"segment": t, "step": step, "knn": acc, "loss": float(out["loss"])})
        print(f"[{name}] segment {t} step {step} loss {float(out['loss']):.3f} kNN {acc:.4f} "
              f"({step * batch / t_train:.0f} img/s)", flush=True)
    return {"recipe": name, "overrides": overrides, "curve": curve, "train_s": t_train,
            "images_per_s": step * batch / t_train, "final_knn": curve[-1]["knn"],
            "random_init_knn": curve[0]["knn"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--steps-per-segment", type=int, default=60)
    ap.add_argument("--test-images", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", action="append", default=[], help="NAME=key=value,key=value")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from streamssl.evaluate.after_segment import probe_sets

    cfg = load_config(DEFAULT_CONFIG, [f"data.dataset_dir={args.dataset}"])
    train_ids, _, val_ids = probe_sets(cfg)
    test_ids = val_ids.slice(0, args.test_images)  # selection never reads the test split
    probe = (load_images(args.dataset, train_ids.select(["image_id"]), cfg),
             load_images(args.dataset, test_ids.select(["image_id"]), cfg))
    results = []
    for spec in args.recipe or ["default="]:
        name, _, rest = spec.partition("=")
        results.append(run_recipe(name, [o for o in rest.split(",") if o], args, probe))
    print()
    print("| recipe | overrides | img/s | kNN random init | kNN per segment | final kNN |")
    print("|---|---|---:|---:|---|---:|")
    for r in results:
        per_seg = " ".join(f"{c['knn']:.3f}" for c in r["curve"][1:])
        print(f"| {r['recipe']} | {' '.join(r['overrides']) or '-'} | {r['images_per_s']:.0f} | "
              f"{r['random_init_knn']:.4f} | {per_seg} | {r['final_knn']:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
