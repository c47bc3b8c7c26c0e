"""What an RGB photo stream trains at on a CPU: ResNet-18, SimCLR, ``rgb_imagenet`` views.

Two measurements on the photos that installed packages ship (Debian ``mate-backgrounds``,
matplotlib, scikit-learn; see ``bench_decode.py``):

* ``--compute SIZE:STEM ...`` (default): one SimCLR training step (two ``rgb_imagenet`` views on
  the device, ResNet-18 forward + backward, SGD) on a batch of the photos decoded at SIZE, in this
  process with one thread, ``STEM`` = ``cifar`` (3x3, no max-pool) or ``imagenet`` (7x7 stride 2
  + max-pool). Reported: images per CPU-second (``time.process_time``), i.e. per core, which stays
  meaningful on a shared, loaded host; a 2-core machine trains at most about twice that.
* ``--full-path SIZE:STEM:DECODE ...``: the same model through the whole path (ingest with
  ``--max-side``, Ray Data -> Ray Train with 2 workers -> DeepSpeed), one segment of ``--steps``
  steps; images/s after the first ``WARMUP_STEPS`` steps from rank 0's step times (wall clock).

    python benchmarks/bench_photo_recipe.py --compute 64:cifar 64:imagenet 128:imagenet 224:imagenet
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WARMUP_STEPS = 2


def run_case(dataset: str, run_dir: Path, size: int, stem: str, decode: str, steps: int, batch: int) -> dict:
    from streamssl import console
    from streamssl.config import load_config
    from streamssl.run import checkpoint as ck
    from streamssl.train.driver import StreamRunner

    overrides = [f"data.dataset_dir={dataset}", "data.source=manifest", f"data.image_size={size}", "data.channels=3",
                 f"data.decode={decode}", "data.shuffle_buffer=64", "data.val_fraction=0",
                 "stream.protocol=instance", "stream.segments=1",
                 "ssl.method=simclr", "ssl.backbone=resnet18", f"ssl.cifar_stem={str(stem == 'cifar').lower()}",
                 "ssl.augment=rgb_imagenet", f"optim.batch_size={batch}", f"optim.steps_per_segment={steps}",
                 "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "eval.enabled=false", "tracking.enabled=false"]
    cfg = load_config(ROOT / "configs" / "fashion_mnist_class_incremental.yaml", overrides)
    t0 = time.perf_counter()
    with console.session():
        (result,) = StreamRunner(cfg, run_dir, callbacks=[]).run()
    wall = time.perf_counter() - t0
    rows = ck.read_steps(result.checkpoint_dir)[WARMUP_STEPS:]
    per_step = batch * 2
    loop = sum(r["step_time_s"] for r in rows)
    return {"size": size, "stem": stem, "decode": decode, "global_batch": per_step, "steps": steps,
            "images_per_s_after_warmup": round(per_step * len(rows) / loop, 2),
            "data_wait_s_per_step": round(float(np.mean([r["data_wait_s"] for r in rows])), 3),
            "step_s_median": round(float(np.median([r["step_time_s"] for r in rows])), 3),
            "fit_wall_s": round(wall, 1), "overrides": overrides[2:]}


def compute_case(photos: list[bytes], size: int, stem: str, batch: int, steps: int) -> dict:
    """Images per CPU-second of one-thread SimCLR steps on ``batch`` photos at ``size`` px."""
    import torch

    from streamssl.config import load_config
    from streamssl.data.images import decode_to_array
    from streamssl.ssl import build_augment, build_method
    from streamssl.train.worker import build_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "fashion_mnist_class_incremental.yaml",
                      [f"data.image_size={size}", "data.channels=3", "ssl.method=simclr", "ssl.backbone=resnet18",
                       f"ssl.cifar_stem={str(stem == 'cifar').lower()}", "ssl.augment=rgb_imagenet"])
    images = torch.from_numpy(np.stack([decode_to_array(photos[i % len(photos)], size, 3) for i in range(batch)]))
    model = build_method(cfg.ssl, in_channels=3)
    opt = build_optimizer([p for p in model.trainable_parameters() if p.requires_grad], cfg)
    aug = build_augment(cfg.ssl.augment, size, 3)
    model.train()
    cpu = []
    for step in range(steps + 1):  # the first step warms up
        c0 = time.process_time()
        out = model(aug(images), aug(images))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.on_after_step()
        if step:
            cpu.append(time.process_time() - c0)
    return {"size": size, "stem": stem, "batch": batch, "steps": steps,
            "images_per_cpu_s": round(batch * len(cpu) / sum(cpu), 2),
            "cpu_s_per_step": round(float(np.mean(cpu)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compute", nargs="*", default=["64:cifar", "64:imagenet", "128:imagenet", "224:imagenet"])
    ap.add_argument("--full-path", nargs="*", default=[], metavar="SIZE:STEM:DECODE")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per case (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=16, help="images per step (per worker on the full path)")
    ap.add_argument("--repeat", type=int, default=20, help="full path: copies of each photo in the manifest")
    ap.add_argument("--max-side", type=int, default=256, help="full path: ingest --max-side")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from bench_decode import DEFAULT_PHOTOS, packaged_photos

    from streamssl.data.ingest import ingest

    photos = sorted({p for pat in DEFAULT_PHOTOS for p in glob.glob(pat)}) + packaged_photos()
    report: dict = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                    "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in os.getloadavg()],
                    "compute": [], "full_path": []}
    datas = [Path(p).read_bytes() for p in photos]
    for case in args.compute:
        size, stem = case.split(":")
        res = compute_case(datas, int(size), stem, args.batch, args.steps)
        report["compute"].append(res)
        print(json.dumps(res), flush=True)
    if args.full_path:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "photos.csv"
            with manifest.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "image_id", "class_name"])
                for r in range(args.repeat):
                    for p in photos:
                        w.writerow([p, f"{Path(p).stem}-{r}", Path(p).stem])
            dataset = str(Path(tmp) / "ds")
            ingest("manifest", dataset, src=str(manifest), max_side=args.max_side)
            for case in args.full_path:
                size, stem, decode = case.split(":")
                res = run_case(dataset, Path(tmp) / f"run-{size}-{stem}-{decode}", int(size), stem, decode,
                               args.steps, args.batch)
                report["full_path"].append(res)
                print(json.dumps(res), flush=True)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
