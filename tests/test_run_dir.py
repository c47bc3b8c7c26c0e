"""The run directory's one owner (streamssl.run): names, state.json, results.json, JSON writing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from streamssl.data import layout as data_layout
from streamssl.run import layout
from streamssl.run.jsonio import read_json, write_json_atomic
from streamssl.run.layout import RunLayout
from streamssl.run.records import SegmentResult, result_from_dict, result_to_dict
from streamssl.run.results import read_results_file, write_results
from streamssl.run.state import RunState, read_state, write_state


def _result(t: int, run: RunLayout) -> SegmentResult:
    return SegmentResult(t, str(run.checkpoint(t)), str(run.checkpoint(t - 1)) if t else None, 100, 7,
                         {"train/loss": float("nan"), "data/segment_images": 100, "eval/knn_acc": 0.5},
                         classes=["0"], accuracy_row={"knn": [0.5, float("nan")]})


def test_layout_names_and_paths(tmp_path: Path) -> None:
    run = RunLayout(tmp_path)
    assert run.checkpoint(3).uri == str(tmp_path / "checkpoints" / "segment-003")
    assert RunLayout.of_checkpoint(run.checkpoint(3)).root.uri == str(tmp_path)
    assert (run.config.name, run.state.name, run.results.name, run.mlflow_run.name) == \
        ("config.yaml", "state.json", "results.json", "mlflow_run.json")
    # The plan copy is written by streamssl.data; both must name its metadata file alike.
    assert Path(run.plan_meta) == tmp_path / "plan" / data_layout.STREAM_META_FILE == tmp_path / layout.PLAN_DIR / layout.PLAN_META_FILE


def test_state_and_results_share_one_entry_form(tmp_path: Path) -> None:
    run = RunLayout(tmp_path)
    results = [_result(0, run), _result(1, run)]
    write_state(tmp_path, RunState(completed=results, in_progress={"segment": 2, "ray_run_name": "segment-002-x"}))
    write_results(tmp_path, results, {"wall_s": 1.0}, averages=lambda A: (0.0, 1.0))
    state_doc = json.loads(run.state.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    results_doc = json.loads(run.results.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert state_doc["completed"] == results_doc["segments"] == [result_to_dict(r) for r in results]
    assert state_doc["completed"][0]["metrics"]["train/loss"] is None  # strict JSON

    state = read_state(tmp_path)
    assert state.in_progress == {"segment": 2, "ray_run_name": "segment-002-x"}
    assert state.last_checkpoint == str(run.checkpoint(1))
    back = state.completed[0]
    assert math.isnan(back.metrics["train/loss"]) and math.isnan(back.accuracy_row["knn"][1])
    assert back.metrics["data/segment_images"] == 100 and isinstance(back.metrics["data/segment_images"], int)
    segments, extra = read_results_file(tmp_path)
    assert [s.checkpoint_dir for s in segments] == [r.checkpoint_dir for r in results] and extra == {"wall_s": 1.0}


def test_old_state_entries_still_resume(tmp_path: Path) -> None:
    """state.json written before the shared form named the checkpoint ``checkpoint``."""
    from streamssl.run.checkpoint import resolve_checkpoint

    old = {"segment": 0, "checkpoint": str(tmp_path / "checkpoints" / "segment-000"), "parent_checkpoint": None,
           "num_images": 10, "num_replay_images": 0, "metrics": {"train/loss": float("nan")}, "classes": [],
           "domains": [], "step_metrics_file": None, "accuracy_row": {}}
    (tmp_path / "state.json").write_text(json.dumps({"completed": [old], "in_progress": None}))  # NaN literal, as then
    state = read_state(tmp_path)
    assert state.completed[0].checkpoint_dir == old["checkpoint"] and math.isnan(state.completed[0].metrics["train/loss"])
    assert resolve_checkpoint(tmp_path).uri == old["checkpoint"]
    assert result_from_dict(old).checkpoint_dir == state.completed[0].checkpoint_dir
    assert read_state(tmp_path / "none") == RunState()


def test_json_writer_is_atomic_and_strict(tmp_path: Path) -> None:
    import numpy as np

    p = write_json_atomic(tmp_path / "x.json", {"a": float("inf"), "b": np.float32(0.5), "c": (1, 2)})
    assert read_json(p) == {"a": None, "b": 0.5, "c": [1, 2]}
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_run_dir_uris(tmp_path: Path) -> None:
    """file:// is local disk; a scheme no pyarrow filesystem serves is a config error naming run_dir."""
    from streamssl.config import ConfigError
    from streamssl.run.layout import canonical_run_dir
    from streamssl.storage import Location

    assert canonical_run_dir(f"file://{tmp_path}/run") == str(tmp_path / "run")
    assert RunLayout(f"file://{tmp_path}/run").is_local
    with pytest.raises(ConfigError, match="run_dir"):
        canonical_run_dir("nosuchfs://bucket/run")
    # A URI keeps its credentials and query for every location below it.
    loc = Location("s3://key:secret@bucket/runs/x?endpoint_override=127.0.0.1:9000&scheme=http")
    assert (RunLayout(loc).checkpoint(2) / "meta.json").uri == \
        "s3://key:secret@bucket/runs/x/checkpoints/segment-002/meta.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert RunLayout.of_checkpoint(RunLayout(loc).checkpoint(2)).root == loc and not loc.is_local
    with pytest.raises(TypeError):
        Path(loc)  # a URI is never mistaken for a local path
