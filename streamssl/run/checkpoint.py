"""Segment checkpoints: what one segment hands to the next, in a format that is safe to load.

A segment checkpoint is a directory::

    meta.json       segment, steps, images seen, config of the model, input spec, final flag
    model.pt        the SSL method's state_dict (backbone, heads, momentum encoder, MoCo queue)
    strategy.pt     regularizer state (importance and anchor weights), if any
    steps.jsonl     per-step metrics from rank 0
    replay/         replay buffer rows + sampler state (written by the driver)
    engine/         DeepSpeed engine state (optimizer shards); only in in-segment checkpoints

``model.pt`` and ``strategy.pt`` hold only tensors and plain containers, so they load with
``torch.load(weights_only=True)``. DeepSpeed's own ``engine/`` files are read by DeepSpeed (which
unpickles) and only to restart a segment from checkpoints this same run wrote.

Directories are published atomically: written under a temporary name, then renamed, so a killed
process never leaves a directory that looks like a finished checkpoint.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from streamssl.run.jsonio import read_json, write_json_atomic
from streamssl.run.layout import (  # noqa: F401  (the checkpoint's file names, as ck.MODEL_FILE ...)
    ENGINE_DIR,
    META_FILE,
    MODEL_FILE,
    REPLAY_DIR,
    STEPS_FILE,
    STRATEGY_FILE,
    RunLayout,
)
from streamssl.run.state import read_state


def save_tensors(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file + rename, so readers never see a half-written file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_meta(ckpt_dir: str | Path, meta: dict[str, Any]) -> Path:
    """``meta.json`` (strict JSON: a non-finite metric is written as null)."""
    return write_json_atomic(Path(ckpt_dir) / META_FILE, meta)


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(ckpt_dir) / META_FILE)


def is_segment_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / META_FILE).is_file() and (p / MODEL_FILE).is_file()


def publish_dir(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically (copy to a sibling temp dir, then rename).

    An existing ``dst`` (left by an earlier attempt at the same segment) is replaced.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(ENGINE_DIR))
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    return dst


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run dir (-> its last completed segment) or a segment checkpoint dir."""
    p = Path(path)
    if is_segment_checkpoint(p):
        return p
    run = RunLayout(p)
    if run.state.is_file():
        last = read_state(p).last_checkpoint
        if last is None:
            raise FileNotFoundError(f"{p}: run has no completed segment yet")
        return Path(last)
    ckpts = [c for c in run.segment_checkpoint_dirs() if is_segment_checkpoint(c)]
    if ckpts:
        return ckpts[-1]
    raise FileNotFoundError(f"{p}: not a streamssl run directory or segment checkpoint")


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (float32 view), to prove segment t starts where t-1 ended."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if not torch.is_tensor(v):
            continue
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]
