"""The console of the Ray-running verbs: streamssl's own lines on the console, Ray's in the logs.

The unit tests check the session's routing (library log records to ``logs/driver.log``, errors
to stderr, everything restored afterwards), the ``ray.init`` arguments with and without ``-v``,
and the worker hook that logs Ray Train's placement-group cleaner warning once. The slow test
runs ``streamssl train`` on a 2-segment stream in a subprocess, then again with ``-v``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamssl import console
from streamssl.cli import build_parser
from streamssl.tune.sweep import tune_result
from tests.tiny_stream import image_folder, ingest_folder, stream_config

ROOT = Path(__file__).resolve().parent.parent

# Lines Ray prints on a driver's console: worker output forwarded with a "(Actor pid=N)" prefix,
# and its loggers' "INFO file.py:N -- ..." lines.
RAY_LINE = re.compile(r"\((?:\w+ )?pid=\d+(?:, ip=[\d.]+)?\)|\bINFO\b|PlacementGroupCleaner|Token authentication")


@pytest.fixture
def chatty_library():
    """A logger configured the way Ray and MLflow configure theirs: own stderr handler, no propagation."""
    logger = logging.getLogger("streamssl_test_chatty_library")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger
    logger.removeHandler(handler)


def test_a_quiet_session_logs_libraries_to_the_run_log_and_only_errors_to_the_console(tmp_path, capsys,
                                                                                      chatty_library):
    handlers = list(chatty_library.handlers)
    had_env = "RAY_DATA_DISABLE_PROGRESS_BARS" in os.environ
    with console.session() as s:
        chatty_library.info("Starting execution of Dataset train_0")
        s.use_log_dir(tmp_path / "logs")  # records from before the log directory was known are kept
        chatty_library.warning("Progress bars disabled")
        chatty_library.error("a worker failed")
        assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
        assert console.ray_init_kwargs(None)["log_to_driver"] is False
    err = capsys.readouterr().err
    assert "a worker failed" in err
    assert "Starting execution" not in err and "Progress bars disabled" not in err
    log = (tmp_path / "logs" / console.DRIVER_LOG).read_text()
    assert [ln.split(": ", 1)[1] for ln in log.splitlines()] == [
        "Starting execution of Dataset train_0", "Progress bars disabled", "a worker failed"]
    # Everything is as it was after the session.
    assert chatty_library.handlers == handlers and chatty_library.propagate is False
    assert ("RAY_DATA_DISABLE_PROGRESS_BARS" in os.environ) == had_env
    assert console.current() is None


RAYLET_WARNING = ("WARNING: 4 PYTHON worker processes have been started on node: 8d2f with address: 10.0.0.2, which "
                  "is 2x the maximum expected startup concurrency (2).")
CORE_WORKER_LINE = ("[2026-12-03 11:26:52,948 E 26137 26137] core_worker.cc:2465: Actor with class name: 'A' and ID: "
                    "'0a57' has constructor arguments in the object store and max_restarts > 0.")


def test_rays_folded_lines_are_recognised_and_nothing_else():
    assert console.is_folded(RAYLET_WARNING) and console.is_folded(CORE_WORKER_LINE)
    assert not console.is_folded("segment 1/5 done in 30s (fit 25s): 12000 images")
    assert not console.is_folded("[2026-12-03 11:26:52,948 E 1 1] core_worker.cc:100: Failed to connect to GCS")


def test_the_stderr_filter_logs_folded_lines_and_passes_the_rest_in_order(tmp_path, caplog):
    target = tmp_path / "console.txt"
    with open(target, "wb") as out:
        fd = os.dup(out.fileno())  # stands for the process's stderr
    f = console.NativeStderrFilter(fd)
    with caplog.at_level(logging.WARNING, logger=console.FOLDED_LOGGER):
        f.start()
        os.write(fd, b"Traceback (most recent call last):\n")
        os.write(fd, (CORE_WORKER_LINE + "\n").encode())
        os.write(fd, b"ValueError: boom\n100%|####| 3/3\r")
        f.stop()
    os.close(fd)
    assert target.read_bytes() == b"Traceback (most recent call last):\nValueError: boom\n100%|####| 3/3\r"
    assert [r.getMessage() for r in caplog.records] == [f"stderr: {CORE_WORKER_LINE}"]


def test_a_quiet_session_folds_the_raylets_worker_start_warning_into_the_run_log(tmp_path, capsys):
    from ray._private import worker as ray_worker

    original = ray_worker.print_to_stdstream
    with console.session() as s:
        s.use_log_dir(tmp_path / "logs")
        console._fold_ray_error_messages(s)
        ray_worker.print_to_stdstream({"lines": [RAYLET_WARNING], "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)
        ray_worker.print_to_stdstream({"lines": ["The node with node id: 8d2f has been marked dead"], "pid": "raylet",
                                       "is_err": False}, ignore_prefix=False)
    assert ray_worker.print_to_stdstream is original
    out = capsys.readouterr().out
    assert "has been marked dead" in out and "worker processes have been started" not in out
    log = (tmp_path / "logs" / console.DRIVER_LOG).read_text()
    assert "raylet: WARNING: 4 PYTHON worker processes have been started" in log


def test_ray_init_arguments_with_and_without_v():
    outside = console.ray_init_kwargs("auto")
    assert outside["log_to_driver"] is True and "runtime_env" not in outside  # library use: Ray's defaults
    with console.session(verbose=False):
        quiet = console.ray_init_kwargs(None)
        assert console.tune_verbosity() == 1
    with console.session(verbose=True):
        verbose = console.ray_init_kwargs(None)
        assert console.tune_verbosity() == 2 and console.is_verbose()
    assert quiet["log_to_driver"] is False and verbose["log_to_driver"] is True
    hook = "streamssl.console.setup_ray_worker"
    assert quiet["runtime_env"] == {"worker_process_setup_hook": hook,
                                    "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    assert verbose["runtime_env"] == {"worker_process_setup_hook": hook}  # -v: Ray Data as Ray has it


def test_a_verbose_session_leaves_library_loggers_on_the_console(capsys, chatty_library):
    with console.session(verbose=True):
        console.adopt_library_loggers()
        chatty_library.info("Starting execution of Dataset train_0")
    assert "Starting execution" in capsys.readouterr().err


def test_the_placement_group_cleaner_warning_is_logged_once_per_worker():
    logger = logging.getLogger(console.PG_CLEANER_LOGGER)
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    collect = Collect()
    logger.addHandler(collect)
    try:
        console.setup_ray_worker()
        console.setup_ray_worker()  # idempotent
        for _ in range(3):
            logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily "
                           "unavailable. Continuing to monitor.")
        logger.warning("Detected that the Ray Train controller actor is dead.")
    finally:
        logger.removeHandler(collect)
        logger.filters.clear()
    assert len(seen) == 2 and seen[0].startswith("Failed to query") and seen[1].startswith("Detected")


def test_v_goes_before_or_after_the_verb():
    p = build_parser()
    assert p.parse_args(["-v", "train", "c.yaml"]).verbose is True
    assert p.parse_args(["train", "c.yaml", "-v"]).verbose is True
    assert p.parse_args(["tune", "c.yaml", "--verbose"]).verbose is True
    assert p.parse_args(["train", "c.yaml"]).verbose is False


def test_a_tune_result_leads_with_what_the_trial_table_shows():
    r = tune_result(1, {"time/fit_s": 3.0, "train/loss": 2.0, "eval/knn_acc": 0.5}, "eval/knn_acc")
    assert list(r)[:3] == ["segment", "eval/knn_acc", "train/loss"]


# --------------------------------------------------------------------------- end to end


def _tiny_run_config(tmp_path: Path, ray_address: str, segments: int) -> Path:
    src = image_folder(tmp_path / "src", num_classes=4, train_per_class=24, test_per_class=6, seed=3)
    ds = ingest_folder(src, tmp_path / "ds")
    cfg = {"name": "console", **stream_config(ds, ray_address, stream={"segments": segments},
                                              optim={"steps_per_segment": 2}, replay={"size": 16, "ratio": 0.25})}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "streamssl.cli", *args], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_train_prints_a_short_console_and_names_its_logs_and_v_shows_ray(tmp_path, ray_local):
    cfg = _tiny_run_config(tmp_path, ray_local, segments=2)
    run_dir = tmp_path / "run"
    out = _cli(tmp_path, "train", str(cfg), "--run-dir", str(run_dir), "--progress-every", "0")
    lines = out.split("\n")  # not splitlines(): a carriage return is no new line on a terminal
    assert len(lines) <= 60, out
    assert [ln.split(" done in")[0] for ln in lines if re.match(r"segment \d+/2 done in", ln)] == [
        "segment 1/2", "segment 2/2"], out
    assert "| segment | classes |" in out and re.search(r"^\| 1 \| ", out, re.M), out
    assert not [ln for ln in lines if RAY_LINE.search(ln) or "raylet" in ln or "core_worker" in ln], out
    # In-segment progress reaches a pipe before the segment's "done" line (--progress-every 0:
    # a line for every batch of step records).
    first_done = next(i for i, ln in enumerate(lines) if re.match(r"segment 1/2 done in", ln))
    assert any(re.match(r"segment 1/2: step \d+/2 \(\d+%\), [\d.]+ img/s, loss [\d.]+, ETA ", ln)
               for ln in lines[:first_done]), out
    logs = run_dir / "logs"
    assert f"logs: {logs / console.DRIVER_LOG}" in out
    ray_logs = [p for p in logs.iterdir() if p.name.startswith(console.RAY_LOGS_PREFIX)]
    assert len(ray_logs) == 1 and str(ray_logs[0]) in out
    # The workers' output is there instead: Ray Train's controller and workers, DeepSpeed.
    worker_out = "".join(p.read_text(errors="replace") for p in ray_logs[0].glob("worker-*"))
    assert "DeepSpeed" in worker_out or "deepspeed" in worker_out

    verbose = _cli(tmp_path, "-v", "train", str(cfg), "--run-dir", str(tmp_path / "run-v"), "stream.segments=1")
    assert re.search(r"\((?:TrainController|RayTrainWorker) pid=\d+", verbose), verbose


def test_the_trial_table_waits_for_changes_to_settle_and_trial_events_are_one_line(capsys, monkeypatch):
    from ray import tune

    from streamssl.tune import reporter
    from streamssl.tune.sweep import progress_metrics

    class Trial:
        def __init__(self, status: str) -> None:
            self.trial_id, self.status, self.error_file = "t0", status, None
            self.config, self.last_result = {"optim.lr": 0.05}, {"training_iteration": 1, "segment": 0}

        def __str__(self) -> str:
            return "t0"

    table = reporter.TrialTable(metric="eval/knn_acc", mode="max", param_space={"optim.lr": tune.grid_search([0.05])},
                                progress_metrics=progress_metrics("eval/knn_acc"))
    assert table._inferred_metric == ["segment", "eval/knn_acc", "train/loss", "eval/val_knn_acc"]
    printed: list[float] = []
    now = [0.0]
    monkeypatch.setattr(reporter.time, "time", lambda: now[0])
    monkeypatch.setattr(table, "_print_heartbeat", lambda trials, *a, force=False: printed.append(now[0]))
    for t, status in [(0, "PENDING"), (2, "RUNNING"), (8, "RUNNING"), (60, "RUNNING"), (61, "TERMINATED"),
                      (70, "TERMINATED")]:
        now[0] = t
        table.print_heartbeat([Trial(status)])
    table.print_heartbeat([Trial("TERMINATED")], force=True)  # nothing new at the end: no second copy
    assert printed == [8, 70]

    table.on_trial_start(0, [], Trial("RUNNING"))
    table.on_trial_result(0, [], Trial("RUNNING"), {"training_iteration": 1, "segment": 0, "eval/knn_acc": 0.51234,
                                                    "train/loss": 5.4, "compute/train_images": 3})
    table.on_trial_complete(0, [], Trial("TERMINATED"))
    out = [ln for ln in capsys.readouterr().out.split("\n") if ln]
    assert out == ["Trial t0 started: optim.lr=0.05",
                   "Trial t0: segment 0 done: eval/knn_acc=0.5123, train/loss=5.4",
                   "Trial t0 ended after segment 0"]


@pytest.mark.ray
def test_a_quiet_sweep_survives_a_trial_error_and_retries_it(tmp_path, ray_local):
    """Tune hands its start time only to the first reporter callback (ours); its own reporter, still
    installed for trial errors, must not crash the experiment on the first error or retry."""
    from ray import tune

    from streamssl.tune.reporter import tune_console

    marker = tmp_path / "failed_once"

    def trainable(config: dict) -> None:
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError("the first attempt fails")
        tune.report({"segment": 0, "eval/knn_acc": 0.5})

    param_space = {"x": tune.grid_search([1])}
    with console.session():
        tuner = tune.Tuner(trainable, param_space=param_space,
                           run_config=tune.RunConfig(name="retry", storage_path=str(tmp_path / "tune"),
                                                     failure_config=tune.FailureConfig(max_failures=1),
                                                     **tune_console(param_space, ["segment", "eval/knn_acc"])))
        grid = tuner.fit()
    assert marker.exists() and not grid.errors and grid[0].metrics["eval/knn_acc"] == 0.5
