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

A checkpoint is addressed by a local path or a URI (it lives in its run directory, which may be
on an object store). Published on local disk it appears atomically (written under a temporary
name, then renamed); on an object store its files are uploaded with ``meta.json`` last, and the run
counts it only once ``state.json`` lists it. Code that needs real files (``torch.load``, evaluation
on another node) reads through :func:`load_tensors` or :func:`local_checkpoint`, never through a
path that only the driver's node has.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from streamssl.run.jsonio import write_json_atomic
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
from streamssl.storage import Location, fetch_dir

PathLike = str | os.PathLike[str] | Location


def save_tensors(obj: Any, path: str | Path) -> None:
    """torch.save to a local temp file + rename, so readers never see a half-written file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tensors(path: PathLike) -> Any:
    """``torch.load(weights_only=True)`` of a local file or a URI."""
    loc = Location(path)
    if loc.is_local:
        return torch.load(loc.path, map_location="cpu", weights_only=True)
    return torch.load(io.BytesIO(loc.read_bytes()), map_location="cpu", weights_only=True)


def write_meta(ckpt_dir: PathLike, meta: dict[str, Any]) -> Location:
    """``meta.json`` (strict JSON: a non-finite metric is written as null)."""
    return write_json_atomic(Location(ckpt_dir) / META_FILE, meta)


def read_meta(ckpt_dir: PathLike) -> dict[str, Any]:
    return (Location(ckpt_dir) / META_FILE).read_json()


def read_steps(ckpt_dir: PathLike) -> list[dict[str, Any]]:
    """The per-step metrics (``steps.jsonl``) of a checkpoint; empty when it has none."""
    f = Location(ckpt_dir) / STEPS_FILE
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def load_model_state(ckpt_dir: PathLike) -> dict[str, torch.Tensor]:
    """The SSL method's state_dict saved in a segment checkpoint."""
    return load_tensors(Location(ckpt_dir) / MODEL_FILE)


def load_strategy_state(ckpt_dir: PathLike) -> dict[str, Any] | None:
    """The regularizers' worker state saved in a checkpoint; None when it holds none."""
    f = Location(ckpt_dir) / STRATEGY_FILE
    return load_tensors(f) if f.is_file() else None


def is_segment_checkpoint(path: PathLike) -> bool:
    p = Location(path)
    return (p / META_FILE).is_file() and (p / MODEL_FILE).is_file()


def local_checkpoint(ckpt_dir: PathLike) -> Path:
    """The checkpoint as a local directory: itself on local disk, else a cached copy (see
    :func:`streamssl.storage.fetch_dir`)."""
    return fetch_dir(Location(ckpt_dir), META_FILE)


def publish_dir(src: str | Path, dst: PathLike) -> Location:
    """Publish the local directory ``src`` as the checkpoint ``dst`` (``engine/`` left out).

    Local disk: copy to a sibling temp dir, then rename (an existing ``dst`` from an earlier
    attempt is replaced). Object store: delete what an earlier attempt left, upload every file,
    ``meta.json`` last.
    """
    loc = Location(dst)
    if not loc.is_local:
        loc.delete()
        staged = Path(src)
        tmp = staged.parent / f".{staged.name}.upload-{uuid.uuid4().hex[:8]}"
        shutil.copytree(staged, tmp, ignore=shutil.ignore_patterns(ENGINE_DIR))
        try:
            loc.upload_from(tmp, last=META_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return loc
    d = loc.local_path()
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.parent / f".{d.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(ENGINE_DIR))
    if d.exists():
        old = d.parent / f".{d.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(d, old)
        os.replace(tmp, d)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, d)
    return loc


def resolve_checkpoint(path: PathLike) -> Location:
    """Accept a run dir (-> its last completed segment) or a segment checkpoint dir."""
    p = Location(path)
    if is_segment_checkpoint(p):
        return p
    run = RunLayout(p)
    if run.state.is_file():
        last = read_state(p).last_checkpoint
        if last is None:
            raise FileNotFoundError(f"{p}: run has no completed segment yet")
        return Location(last)
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
