"""SSL training throughput: the full streamssl path vs a bare PyTorch loop, side by side.

Full path: Ray Data reads and decodes one Fashion-MNIST segment -> Ray Train TorchTrainer with
N workers -> DeepSpeed engine per worker -> two augmented views -> MoCo v2 step.
Bare loop: the same segment's images already in memory as a uint8 tensor, one process using
the same number of CPU threads as the workers together, the same model, global batch,
augmentation and optimizer.

Reported per segment of the full path: images/s inside the training loop as the workers measure
it (every step, so the first step's wait for the data pipeline counts), the same after the
bare loop's warm-up steps (from rank 0's per-step times in ``steps.jsonl``: the like-for-like
figure), the seconds rank 0 waited for data, and the per-segment overhead outside the loop.
The bare loop runs before and after the full path (the machine's speed drifts on a shared
host) and the ratios use the mean of the two. Run:

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


WARMUP_STEPS = 3  # steps the bare loop runs before its clock starts


def full_path(cfg_overrides: list[str], run_dir: Path) -> list[dict[str, float]]:
    """One entry per segment: segment 0 pays the cold start (first DeepSpeed op build, Ray
    worker imports), segment 1 shows the steady per-segment cost of a long stream."""
    from streamssl import console
    from streamssl.run import checkpoint as ck
    from streamssl.train.driver import StreamRunner

    cfg = load_config(ROOT / "configs" / "fashion_mnist_class_incremental.yaml", cfg_overrides)
    with console.session():  # what `streamssl train` runs in: no progress bars, worker logs to files
        results = StreamRunner(cfg, run_dir, callbacks=[]).run()
    out = []
    for r in results:
        steps = ck.read_steps(r.checkpoint_dir)
        per_step_images = r.metrics["train/images_seen"] / max(len(steps), 1)
        after_warmup = sum(s["step_time_s"] for s in steps[WARMUP_STEPS:])
        out.append({"images_per_s": r.metrics["train/images_per_s"], "fit_s": r.metrics["time/fit_s"],
                    "loop_s": r.metrics["time/train_loop_s"], "overhead_s": r.metrics["time/overhead_s"],
                    "data_wait_s": r.metrics.get("time/data_wait_s", float("nan")),
                    "images_per_s_after_warmup": per_step_images * len(steps[WARMUP_STEPS:]) / max(after_warmup, 1e-9),
                    # The median step is one no read task competed with: the per-step cost of the
                    # training machinery alone (DeepSpeed, gloo, Ray Train), without the decoding.
                    "images_per_s_median_step": per_step_images / max(float(np.median(
                        [s["step_time_s"] for s in steps[WARMUP_STEPS:]] or [float("nan")])), 1e-9),
                    "images": r.metrics["train/images_seen"]})
    return out


def bare_loop(cfg_overrides: list[str], run_dir: Path, threads: int, gpu: bool = False) -> dict[str, float]:
    from streamssl.data.segments import read_rows_local
    from streamssl.ssl import build_augment, build_method
    from streamssl.train.driver import ensure_plan, segment_rows
    from streamssl.train.worker import build_optimizer

    cfg = load_config(ROOT / "configs" / "fashion_mnist_class_incremental.yaml", cfg_overrides)
    plan, _ = ensure_plan(cfg, run_dir)  # the plan the full path trains on (made by the first caller)
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
    done, warmup = 0, WARMUP_STEPS
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
    # Three segments: segment 0 is the cold start; segment 1 is the steady state of a long stream
    # (it also opens segment 2's data pipeline during its last steps, as every middle segment
    # does); segment 2, the last, has no successor to open, so it flatters the steady state.
    overrides = [f"data.dataset_dir={args.dataset}", f"optim.steps_per_segment={args.steps}", "stream.segments=3",
                 *([f"ssl.width={args.width}"] if args.width else []),
                 "eval.enabled=false", "tracking.enabled=false", "replay.size=0",
                 f"scaling.num_workers={args.workers}", "optim.warmup_steps=0",
                 *(["scaling.use_gpu=true", "scaling.precision=bf16"] if args.gpu else [])]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        bares = [bare_loop(overrides, run_dir, threads=args.workers, gpu=args.gpu)]
        segs = full_path(overrides, run_dir)
        bares.append(bare_loop(overrides, run_dir, threads=args.workers, gpu=args.gpu))
    bare_rate = float(np.mean([b["images_per_s"] for b in bares]))
    warm = segs[1]
    result = {"steps": args.steps, "workers": args.workers, "full_per_segment": segs, "bare": bares,
              "bare_images_per_s": bare_rate,
              "ratio_in_loop": warm["images_per_s"] / bare_rate,
              "ratio_after_warmup": warm["images_per_s_after_warmup"] / bare_rate,
              "ratio_median_step": warm["images_per_s_median_step"] / bare_rate,
              "ratio_end_to_end": (warm["images"] / warm["fit_s"]) / bare_rate}
    print(json.dumps(result, indent=2))
    print()
    print(f"| path | images/s in loop (all steps) | after {WARMUP_STEPS} warm-up steps | at the median step "
          "| data wait s | overhead s | ratio vs bare (all / after warm-up / median step) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for i, seg in enumerate(segs):
        label = {0: " (cold)", 1: " (steady)", len(segs) - 1: " (last)"}.get(i, "")
        print(f"| Ray Data -> Ray Train ({args.workers} workers) -> DeepSpeed, segment {i}{label} | "
              f"{seg['images_per_s']:.0f} | {seg['images_per_s_after_warmup']:.0f} | "
              f"{seg['images_per_s_median_step']:.0f} | {seg['data_wait_s']:.2f} | {seg['overhead_s']:.1f} | "
              f"{seg['images_per_s'] / bare_rate:.2f} / {seg['images_per_s_after_warmup'] / bare_rate:.2f} / "
              f"{seg['images_per_s_median_step'] / bare_rate:.2f} |")
    print(f"| same, segment 1 including its overhead | {warm['images'] / warm['fit_s']:.0f} | | | | | "
          f"{result['ratio_end_to_end']:.2f} |")
    runs = ", ".join(f"{b['images_per_s']:.0f}" for b in bares)
    print(f"| bare PyTorch loop, {args.workers} threads, in-memory (before, after: {runs}) | {bare_rate:.0f} | | | - "
          "| - | 1.00 |")


if __name__ == "__main__":
    main()
