"""SSL training throughput: the full streamssl path vs a bare PyTorch loop, side by side.

Full path: Ray Data reads and decodes one Fashion-MNIST segment -> Ray Train TorchTrainer with
N workers -> DeepSpeed engine per worker -> two augmented views -> MoCo v2 step.
Bare loop: the same segment's images already in memory as a uint8 tensor, one process using
the same number of CPU threads as the workers together, the same model, global batch,
augmentation and optimizer.

Reported: steady-state images/s inside the training loop (what the workers measure, start-up
excluded), the fixed per-segment overhead of a ``TorchTrainer.fit()`` (fit wall time minus loop
time), and the ratios. Run:

    .venv/bin/python benchmarks/bench_train_throughput.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from streamssl.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def full_path(cfg_overrides: list[str], run_dir: Path) -> list[dict[str, float]]:
    """One entry per segment: segment 0 pays the cold start (first DeepSpeed op build, Ray
    worker imports), segment 1 shows the steady per-segment cost of a long stream."""
    from streamssl.train.driver import StreamRunner

    cfg = load_config(ROOT / "configs" / "fashion_mnist_class_incremental.yaml", cfg_overrides)
    results = StreamRunner(cfg, run_dir, callbacks=[]).run()
    return [{"images_per_s": r.metrics["train/images_per_s"], "fit_s": r.metrics["time/fit_s"],
             "loop_s": r.metrics["time/train_loop_s"], "overhead_s": r.metrics["time/overhead_s"],
             "images": r.metrics["train/images_seen"]} for r in results]


def bare_loop(cfg_overrides: list[str], run_dir: Path, threads: int, gpu: bool = False) -> dict[str, float]:
    from streamssl.data.segments import read_rows_local
    from streamssl.data.plan import load_plan
    from streamssl.ssl import build_augment, build_method
    from streamssl.train.driver import segment_rows
    from streamssl.train.worker import build_optimizer

    cfg = load_config(ROOT / "configs" / "fashion_mnist_class_incremental.yaml", cfg_overrides)
    plan, _ = load_plan(str(run_dir / "plan"))  # the plan the full path trained on
    rows = segment_rows(plan, [0], None)
    data = read_rows_local(cfg.data.dataset_dir, rows, image_size=cfg.data.image_size, channels=cfg.data.channels)
    device = torch.device("cuda" if gpu else "cpu")
    images = torch.from_numpy(np.ascontiguousarray(data["image"])).to(device)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_method(cfg.ssl, in_channels=cfg.data.channels).to(device)
    opt = build_optimizer([p for p in model.trainable_parameters() if p.requires_grad], cfg)
    aug = build_augment(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels).to(device)
    # On GPU the bare loop runs in bf16 autocast, like the full path with scaling.precision=bf16.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu)
    batch = cfg.optim.batch_size * cfg.scaling.num_workers  # same global batch as the workers together
    steps = cfg.optim.steps_per_segment
    model.train()
    done, warmup = 0, 3
    t0 = 0.0
    for step in range(steps + warmup):
        if step == warmup:
            t0 = time.perf_counter()
        idx = torch.randint(0, images.shape[0], (batch,), device=device)
        x = images[idx]
        with autocast:
            out = model(aug(x), aug(x))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.on_after_step()
        if step >= warmup:
            done += batch
    if gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"images_per_s": done / dt, "loop_s": dt, "images": done}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dataset", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--width", type=int, default=None, help="small_cnn width (default: the config's)")
    ap.add_argument("--gpu", action="store_true", help="both paths on CUDA in bf16 (scaling.use_gpu, precision)")
    args = ap.parse_args()
    # Two segments (5 classes each): the second one's fit is the warm, steady-state case.
    overrides = [f"data.dataset_dir={args.dataset}", f"optim.steps_per_segment={args.steps}", "stream.segments=2",
                 *([f"ssl.width={args.width}"] if args.width else []),
                 "eval.enabled=false", "tracking.enabled=false", "replay.size=0",
                 f"scaling.num_workers={args.workers}", "optim.warmup_steps=0",
                 *(["scaling.use_gpu=true", "scaling.precision=bf16"] if args.gpu else [])]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        segs = full_path(overrides, run_dir)
        bare = bare_loop(overrides, run_dir, threads=args.workers, gpu=args.gpu)
    warm = segs[-1]
    result = {"steps": args.steps, "workers": args.workers, "full_per_segment": segs, "bare": bare,
              "ratio_in_loop": warm["images_per_s"] / bare["images_per_s"],
              "ratio_end_to_end": (warm["images"] / warm["fit_s"]) / bare["images_per_s"]}
    print(json.dumps(result, indent=2))
    print()
    print("| path | images/s (in loop) | fit overhead s | ratio vs bare |")
    print("|---|---:|---:|---:|")
    for i, seg in enumerate(segs):
        print(f"| Ray Data -> Ray Train ({args.workers} workers) -> DeepSpeed, segment {i}"
              f"{' (cold)' if i == 0 else ''} | {seg['images_per_s']:.0f} | {seg['overhead_s']:.1f} | "
              f"{seg['images_per_s'] / bare['images_per_s']:.2f} |")
    print(f"| same, segment {len(segs) - 1} including the fit start-up | {warm['images'] / warm['fit_s']:.0f} | | "
          f"{result['ratio_end_to_end']:.2f} |")
    print(f"| bare PyTorch loop, {args.workers} threads, in-memory | {bare['images_per_s']:.0f} | - | 1.00 |")


if __name__ == "__main__":
    main()
