"""``streamssl embed``: one embedding per image of a dataset, from a run's encoder, as Parquet.

The images are read and decoded by Ray Data (the same pipeline as training and evaluation) and
encoded by the evaluation's actor pool (:func:`streamssl.evaluate.features.encode_dataset`): one
actor per GPU of the cluster, or CPU actors where there is none. Ray Data writes the result from
the actors' outputs straight to the destination, so no embedding passes through the driver.

Each row: ``image_id`` (the dataset index's id), ``segment`` and ``checkpoint`` (the encoder's
segment and checkpoint directory), ``embedding`` (``list<float32>``, the backbone's features, the
representation the evaluation's kNN and linear probes use). Undecodable images get no row; their
number is in the summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamssl.storage import Location

__all__ = ["EMBEDDING_SCHEMA", "EmbedSummary", "embed", "embedding_table", "segment_checkpoint"]

EMBEDDING_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("segment", pa.int32()),
    pa.field("checkpoint", pa.string()),
    pa.field("embedding", pa.list_(pa.float32()), nullable=False),
])


@dataclass
class EmbedSummary:
    out: str
    checkpoint: str
    segment: int | None
    images: int  # rows of the dataset (split) asked for
    embedded: int  # rows written
    skipped: int  # undecodable images
    dim: int
    wall_s: float
    images_per_s: float


def segment_checkpoint(run_dir: str | os.PathLike[str], segment: int | None) -> tuple[Location, int | None]:
    """(checkpoint, its segment) of a run directory's finished segment ``segment`` (None: the last
    finished one); a segment checkpoint directory given as ``run_dir`` is taken as it is."""
    from streamssl.run import checkpoint as ck
    from streamssl.run.layout import RunLayout
    from streamssl.run.state import read_state

    path = Location(run_dir)
    if ck.is_segment_checkpoint(path):
        meta = ck.read_meta(path)
        if segment is not None and meta.get("segment") != segment:
            raise ValueError(f"{path} is the checkpoint of segment {meta.get('segment')}, not --segment {segment}")
        return path, meta.get("segment")
    run = RunLayout(path)
    if run.state.is_file():
        done = {r.segment: Location(r.checkpoint_dir) for r in read_state(path).completed}
    else:  # checkpoints without a state file (copied or assembled by hand)
        done = {int(ck.read_meta(c).get("segment", i)): c
                for i, c in enumerate(c for c in run.segment_checkpoint_dirs() if ck.is_segment_checkpoint(c))}
    if not done:
        raise FileNotFoundError(f"{path}: no finished segment to embed with (not a run directory with a "
                                "finished segment, nor a segment checkpoint)")
    if segment is None:
        segment = max(done)
    if segment not in done:
        raise ValueError(f"--segment {segment}: not a finished segment of {path} (finished: "
                         f"{', '.join(map(str, sorted(done)))})")
    return done[segment], segment


def embedding_table(batch: dict[str, np.ndarray], segment: int | None, checkpoint: str) -> pa.Table:
    """An encoded batch (``image_id``, ``features`` (N, D)) as rows of :data:`EMBEDDING_SCHEMA`."""
    feats = batch["features"]
    if feats.dtype == object:
        feats = np.stack(list(feats)) if len(feats) else np.zeros((0, 0), np.float32)
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    n, dim = feats.shape[0], feats.shape[1] if feats.ndim == 2 else 0
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
    vectors = pa.ListArray.from_arrays(offsets, pa.array(feats.reshape(-1), pa.float32()))
    return pa.Table.from_arrays([
        pa.array([str(i) for i in batch["image_id"]], pa.string()),
        pa.array(np.full(n, -1 if segment is None else segment, np.int32)),
        pa.array([checkpoint] * n, pa.string()),
        vectors,
    ], schema=EMBEDDING_SCHEMA)


def _actors(use_gpu: bool, actors: int | None) -> int:
    import ray

    if actors is not None:
        if actors < 1:
            raise ValueError(f"--actors {actors}: must be >= 1")
        return actors
    if use_gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 0)))
    # CPU: leave about half of the cluster's CPUs to the read-and-decode tasks.
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)


def embed(run_dir: str | os.PathLike[str], dataset_dir: str, out: str, *, segment: int | None = None,
          split: str | None = None, batch_size: int = 256, actors: int | None = None,
          use_gpu: bool | None = None, ray_address: str | None = None) -> EmbedSummary:
    """Write the embeddings of every image of ``dataset_dir`` (or of its ``split``) to ``out``
    (a directory of Parquet files: local path or URI) with the encoder of ``run_dir``'s segment
    ``segment`` (None: its last finished segment). ``use_gpu`` None: when the cluster has GPUs."""
    from streamssl import console, load_encoder
    from streamssl.data import layout
    from streamssl.data.segments import read_rows
    from streamssl.evaluate.features import encode_dataset
    from streamssl.run.config_file import config_for_checkpoint
    from streamssl.ssl.augment import eval_transform

    ckpt, seg = segment_checkpoint(run_dir, segment)
    dest = Location(out)
    if dest.exists() and (dest.is_file() or dest.children()):
        raise FileExistsError(f"--out {dest}: already exists; embeddings go to a new location")
    index = layout.read_index(dataset_dir, ["image_id", "split"])
    if split is not None:
        splits = sorted(set(index["split"].to_pylist()))
        index = index.filter(pc.equal(index["split"], split))
        if index.num_rows == 0:
            raise ValueError(f"--split {split!r}: {dataset_dir} has no such split (splits: {', '.join(splits)})")
    if index.num_rows == 0:
        raise ValueError(f"{dataset_dir}: no images to embed")

    encoder = load_encoder(ckpt)
    spec = encoder.input_spec
    cfg = config_for_checkpoint(ckpt)
    console.init_ray(ray_address)
    import ray

    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    t0 = time.perf_counter()
    ds = read_rows(dataset_dir, index.select(["image_id"]), image_size=spec.image_size, channels=spec.channels,
                   order="storage")
    encoded = encode_dataset(encoder.backbone, ds, transform=eval_transform(cfg.ssl.augment, spec.image_size,
                                                                            spec.channels),
                             batch_size=batch_size, use_gpu=use_gpu, concurrency=_actors(use_gpu, actors),
                             num_cpus=0 if use_gpu else 1, with_ids=True)
    rows = encoded.map_batches(embedding_table, fn_kwargs={"segment": seg, "checkpoint": ckpt.uri},
                               batch_format="numpy", batch_size=None)
    kwargs: dict[str, Any] = {} if dest.is_local else {"filesystem": dest.fs}
    rows.write_parquet(dest.path if not dest.is_local else str(dest.local_path()), **kwargs)
    wall = time.perf_counter() - t0
    written = _count_rows(dest)
    return EmbedSummary(out=dest.uri, checkpoint=ckpt.uri, segment=seg, images=index.num_rows, embedded=written,
                        skipped=index.num_rows - written, dim=int(encoder.feature_dim), wall_s=wall,
                        images_per_s=written / max(wall, 1e-9))


def _count_rows(dest: Location) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(dest.path, filesystem=dest.fs, format="parquet").count_rows()
