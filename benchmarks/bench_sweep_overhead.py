"""What a Ray Tune sweep costs on top of the stream it runs: a 1-trial sweep vs the same run.

Both are the real command lines, run as child processes one after the other (each starts its
own local Ray, as a user's command would):

* ``streamssl train CONFIG overrides``;
* ``streamssl tune CONFIG overrides tune.search_space={optim.lr: {grid: [LR]}}``: one trial with
  the same config (a single-point grid), ASHA as in the example sweep config, MLflow sweep run.

The config is the default Fashion-MNIST one cut to a tiny-but-real run: 2 class-incremental
segments of ``--images`` images each (``stream.max_images_per_segment``), 1 epoch per segment,
replay on, MLflow on, per-segment evaluation off (it would add the same seconds to both).
Resources are sized for a 2-core machine with 1 CPU left for Ray Data: 2 workers x 0.4 CPU and,
for the sweep, 0.2 CPU for the trial's stream driver, in both runs.

Reported per run: wall time of the process (start to exit), the time inside the segments'
``TorchTrainer.fit`` calls (from ``state.json``), and the rest; then the sweep/train ratio and the
extra seconds. With ``--repeats N`` the two commands alternate N times and medians are reported.

    .venv/bin/python benchmarks/bench_sweep_overhead.py --images 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "fashion_mnist_class_incremental.yaml"


def overrides(dataset: str, images: int, batch: int) -> list[str]:
    return [f"data.dataset_dir={dataset}", "stream.segments=2", f"stream.max_images_per_segment={images}",
            f"optim.batch_size={batch}", "optim.epochs_per_segment=1", "eval.enabled=false",
            "scaling.num_workers=2", "scaling.cpus_per_worker=0.4", "tune.cpus_per_trial_driver=0.2"]


def run(argv: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # each command starts its own local Ray
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "streamssl.cli", *argv], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed ({proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    return wall


def fit_seconds(run_dir: Path) -> tuple[float, int, int]:
    state = json.loads((run_dir / "state.json").read_text())
    done = state["completed"]
    return (sum(c["metrics"]["time/fit_s"] for c in done), len(done),
            sum(int(c["metrics"]["train/steps"]) for c in done))


def one_round(out: Path, i: int, ov: list[str], lr: float) -> dict[str, dict[str, float]]:
    train_dir = out / f"train-{i}"
    wall_train = run(["train", str(CONFIG), *ov, f"optim.lr={lr}", f"run_dir={train_dir}"], out / f"train-{i}.log")
    fit_train, segs_train, steps_train = fit_seconds(train_dir)

    sweep_dir = out / f"sweep-{i}"
    space = f"tune.search_space={{optim.lr: {{grid: [{lr}]}}}}"
    wall_tune = run(["tune", str(CONFIG), *ov, space, "tune.metric=train/loss", "tune.mode=min",
                     "tune.scheduler=asha", "--sweep-dir", str(sweep_dir)], out / f"sweep-{i}.log")
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    (trial,) = summary["trials"]
    fit_tune, segs_tune, steps_tune = fit_seconds(Path(trial["run_dir"]))
    assert segs_train == segs_tune == 2 and steps_train == steps_tune, (segs_train, segs_tune, steps_train, steps_tune)
    return {"train": {"wall_s": wall_train, "fit_s": fit_train, "steps": steps_train},
            "tune": {"wall_s": wall_tune, "fit_s": fit_tune, "steps": steps_tune}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=str(ROOT / "data" / "fashion-mnist"),
                    help="ingested Fashion-MNIST (streamssl ingest --source fashion-mnist --out DIR)")
    ap.add_argument("--images", type=int, default=2048, help="images per segment")
    ap.add_argument("--batch", type=int, default=64, help="per-worker batch size")
    ap.add_argument("--lr", type=float, default=0.06)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep", default=None, help="keep run dirs and logs here (default: a temp dir)")
    args = ap.parse_args()
    if not (Path(args.dataset) / "dataset.json").is_file():
        raise SystemExit(f"{args.dataset}: no ingested dataset; run streamssl ingest --source fashion-mnist first")
    if Path("/tmp/ray/ray_current_cluster").is_file():
        print("note: /tmp/ray/ray_current_cluster exists: the commands may attach to that cluster "
              "instead of starting their own", file=sys.stderr)

    ov = overrides(str(Path(args.dataset).resolve()), args.images, args.batch)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        out = Path(args.keep).resolve() if args.keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for i in range(args.repeats):
            rounds.append(one_round(out, i, ov, args.lr))
            print(json.dumps(rounds[-1]), flush=True)

    med = {k: {m: statistics.median(r[k][m] for r in rounds) for m in ("wall_s", "fit_s")} for k in ("train", "tune")}
    result = {"images_per_segment": args.images, "segments": 2, "steps_per_run": rounds[0]["train"]["steps"],
              "repeats": args.repeats, "median": med,
              "ratio_wall": med["tune"]["wall_s"] / med["train"]["wall_s"],
              "extra_s": med["tune"]["wall_s"] - med["train"]["wall_s"], "rounds": rounds}
    print(json.dumps(result, indent=2))
    print()
    print("| command | wall s | in TorchTrainer.fit s | rest s |")
    print("|---|---:|---:|---:|")
    for k, name in (("train", "`streamssl train`"), ("tune", "`streamssl tune`, 1 trial")):
        print(f"| {name} | {med[k]['wall_s']:.1f} | {med[k]['fit_s']:.1f} | {med[k]['wall_s'] - med[k]['fit_s']:.1f} |")
    print(f"\nsweep / train wall time: {result['ratio_wall']:.2f} ({result['extra_s']:+.1f} s)")


if __name__ == "__main__":
    main()
