"""``streamssl demo``: the README's main command, end to end on the embedded default.

Ingests Fashion-MNIST (offline, Debian package) if needed, cuts a 5-segment class-incremental
stream, trains MoCo v2 with 2 Ray Train workers + DeepSpeed and replay, evaluates after every
segment, and prints where everything is: run directory, MLflow UI command, a results table with
the two reference rows (raw pixels, random init), and the final encoder against the stronger one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from streamssl.config import Config, load_config
from streamssl.train.callbacks import StreamCallback


def results_table(results: list, references: dict[str, dict[str, float]] | None) -> str:
    """One row per segment, under the reference rows (raw pixels, random init) on the same probes."""
    keys = [("eval/knn_acc", "kNN"), ("eval/linear_acc", "linear"), ("eval/fewshot_acc", "few-shot"),
            ("train/loss", "SSL loss"), ("train/images_per_s", "img/s"), ("time/fit_s", "fit s")]
    lines = ["| segment | classes | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for label, metrics in (references or {}).items():
        lines.append(f"| {label} | - | " + " | ".join(f"{metrics[k]:.4f}" if k in metrics else "" for k, _ in keys)
                     + " |")
    for r in results:
        cells = []
        for k, _ in keys:
            v = r.metrics.get(k)
            cells.append("" if v is None else (f"{v:.4f}" if abs(v) < 10 else f"{v:.0f}"))
        lines.append(f"| {r.segment} | {', '.join(r.classes)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: list, references: dict[str, dict[str, float]], split: str) -> list[str]:
    """The closing lines: the final encoder against the stronger reference, per probe."""
    from streamssl.evaluate.random_init import stronger_reference

    out = []
    final = results[-1].metrics if results else {}
    for key, probe in (("eval/knn_acc", "kNN"), ("eval/linear_acc", "linear")):
        ref = stronger_reference(references, key)
        if key not in final or ref is None:
            continue
        label, value = ref
        gap = final[key] - value
        word = "beats" if gap > 0 else "does NOT beat"
        out.append(f"{probe} accuracy on the {split} split after the last segment: {final[key]:.4f} ({word} "
                   f"{label}, the stronger reference: {value:.4f}, {100 * gap:+.1f} points)")
    return out


def run_demo(config_path: str, overrides: list[str], run_dir: str | None = None, *,
             callbacks_for: Callable[[Config], Sequence[StreamCallback]] = lambda cfg: ()) -> int:
    """Run the demo; ``callbacks_for(cfg)`` adds callbacks next to the progress bar (the CLI passes
    :func:`streamssl.assemble.default_callbacks`, i.e. MLflow tracking)."""
    from streamssl.evaluate.random_init import reference_metrics
    from streamssl.run.layout import RunLayout
    from streamssl.train.driver import StreamRunner
    from streamssl.train.progress import ProgressPrinter

    cfg = load_config(config_path, overrides)
    # What else Ray prints (Ray Data's progress bars among it) is the CLI's console session's
    # business (streamssl.console): kept in the run's logs/, or shown with -v.
    print(f"streamssl demo: {cfg.stream.segments}-segment {cfg.stream.protocol} stream of {cfg.data.source}, "
          f"{cfg.ssl.method} on {cfg.ssl.backbone}, {cfg.scaling.max_workers} Ray Train workers (DeepSpeed ZeRO-"
          f"{cfg.scaling.zero_stage}), replay {cfg.replay.size}, regularization {cfg.regularization.method}",
          flush=True)
    t0 = time.perf_counter()
    with ProgressPrinter() as progress:
        runner = StreamRunner(cfg, run_dir, callbacks=[progress, *callbacks_for(cfg)])
        results = runner.run()
    # The stream's evaluation actor cached both reference rows in the run directory (random_init.json,
    # raw_pixels.json); read back here, not redone.
    references = reference_metrics(cfg, runner.run_dir) if cfg.eval.enabled else {}
    wall = time.perf_counter() - t0
    rd = Path(runner.run_dir)
    run = RunLayout(rd)
    print()
    print(results_table(results, references))
    print()
    for line in verdict(results, references, cfg.data.eval_split):
        print(line)
    print(f"wall time: {wall:.0f} s")
    print(f"run directory: {rd}")
    print(f"  checkpoints:  {run.checkpoints_dir}")
    print(f"  results:      {run.results}")
    if cfg.tracking.enabled and not cfg.tracking.tracking_uri:
        venv_bin = Path(sys.executable).parent
        print("open the MLflow UI on these results with:")
        print(f"  {venv_bin / 'mlflow'} ui --backend-store-uri sqlite:///{run.mlflow_db} "
              f"--host 127.0.0.1 --port 5000")
    return 0
