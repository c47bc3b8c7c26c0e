"""The ingested dataset and the stream plan as MLflow dataset inputs of the stream's runs.

Each becomes an ``mlflow.data`` PandasDataset over its table without image bytes (the dataset's
``index.parquet``, the plan's ``stream.parquet``), whose source is where it lives and whose digest
is the content digest from ``dataset.json`` / ``stream.json``, so MLflow's UI links every run
of a stream, and every segment, to the exact data it trained on.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE, MAX_INPUT_TAG_VALUE_SIZE

from streamssl.storage import Location
from streamssl.tracking.mlflow_store import meta_digest, short
from streamssl.train.callbacks import StreamContext

log = logging.getLogger(__name__)

# (MLflow dataset entity, its input tags) as built once per stream and logged on every run.
DatasetInputSpec = tuple[Any, dict[str, str]]


def read_table_without_bytes(location: str | Location) -> Any:
    """A Parquet file as pandas, minus binary columns (image bytes never go to MLflow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    loc = Location(location)
    with loc.fs.open_input_file(loc.path) as f:
        pf = pq.ParquetFile(f)
        cols = [fld.name for fld in pf.schema_arrow if not pa.types.is_binary(fld.type)
                and not pa.types.is_large_binary(fld.type)]
        return pf.read(columns=cols).to_pandas()


def build_dataset_inputs(ctx: StreamContext) -> list[DatasetInputSpec]:
    """The ingested dataset (its index) and the stream plan as MLflow datasets, with input tags.

    The digest is cut to MLflow's 36-character limit; the full digest is the ``digest_full``
    input tag. When a table cannot be read the dataset is still logged, metadata only.
    """
    import mlflow.data
    from mlflow.data.meta_dataset import MetaDataset

    from streamssl.data import layout

    dataset, plan = Location(ctx.dataset_dir), Location(ctx.plan_dir)
    ds_name = dataset.name or "dataset"
    protocol = ctx.plan_meta.get("protocol", ctx.config.stream.protocol)
    specs = [
        ("dataset", ds_name, dataset, dataset / layout.INDEX_FILE, meta_digest(ctx.dataset_meta)),
        ("stream_plan", f"{ds_name}-stream-{protocol}", plan, plan / layout.STREAM_PLAN_FILE, meta_digest(ctx.plan_meta)),
    ]
    out = []
    for role, name, source, table, digest in specs:
        cut = digest[:MAX_DATASET_DIGEST_SIZE]
        try:
            df = read_table_without_bytes(table)
            with warnings.catch_warnings():  # schema inference hints about nullable ints: not ours to fix
                warnings.simplefilter("ignore")
                entity = mlflow.data.from_pandas(df, source=source.uri, name=name, digest=cut)._to_mlflow_entity()
        except Exception as e:  # noqa: BLE001 - metadata-only input is still useful lineage
            log.warning("could not read %s for the MLflow input (%s); logging metadata only", table.uri, e)
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            entity = MetaDataset(resolve_dataset_source(source.uri), name=name, digest=cut)._to_mlflow_entity()
        tags = {MLFLOW_DATASET_CONTEXT: "train", "role": role, "digest_full": digest}
        out.append((entity, tags))
    return out


def log_dataset_inputs(client: MlflowClient, run_id: str, inputs: Iterable[DatasetInputSpec],
                       extra_tags: Mapping[str, str] | None = None) -> None:
    """Attach the datasets to run ``run_id``; ``extra_tags`` (e.g. the segment) go on every input."""
    dis = [DatasetInput(entity, [InputTag(k, short(str(v), MAX_INPUT_TAG_VALUE_SIZE))
                                 for k, v in {**tags, **(extra_tags or {})}.items()])
           for entity, tags in inputs]
    client.log_inputs(run_id, datasets=dis)
