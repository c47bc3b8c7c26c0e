"""MLflow's web UI on a tracked stream, in headless Chromium (``docs/mlflow_ui_check.py``).

A simulated 2-segment stream is tracked into the run directory's SQLite store (as in
``tests/test_tracking.py``); the check script serves it with ``mlflow server`` and asserts what
the rendered pages show: the experiment link opens on its runs table, the stream run lists its
segments and links its accuracy with the random-init baseline in one chart, its charts include the
baseline, and the accuracy plot opens as an artifact.
Needs a ``chromium`` binary (not a test requirement: skipped without one) and ~1 minute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from tests.test_tracking import FakeRandomInit, MlflowTracker, end_segment, make_stream, start_segment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(BROWSER is None, reason="no chromium binary")]


def test_mlflow_ui_shows_stream_runs_and_random_init_baseline(tmp_path: Path) -> None:
    ctx = make_stream(tmp_path, name="ui-test", random_init=True)
    ctx.config.save(Path(ctx.run_dir) / "config.yaml")
    tracker = MlflowTracker(strict=True, log_model=False, random_init_evaluator=FakeRandomInit())
    tracker.on_stream_start(ctx)
    start_segment(tracker, ctx, 0, live=True)
    r0 = end_segment(tracker, ctx, 0, None)
    start_segment(tracker, ctx, 1, live=False)
    r1 = end_segment(tracker, ctx, 1, r0.checkpoint_dir)
    tracker.on_stream_end(ctx, [r0, r1])

    out = tmp_path / "shots"
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "mlflow_ui_check.py"), "--run-dir", ctx.run_dir,
                           "--out", str(out), "--chromium", str(BROWSER)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads((out / "checks.json").read_text())
    assert [c["page"] for c in checks] == ["experiment_default_view", "experiment", "stream_run", "stream_metrics",
                                          "accuracy_vs_random_init", "accuracy_plot"]
    for c in checks:
        assert 0 < c["bytes"] < 300_000, c
        assert c["ok"] or not c["required"], c
