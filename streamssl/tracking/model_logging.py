"""The stream's final encoder as an MLflow model (a LoggedModel of the stream run), and as a new
version of a registered model in MLflow's model registry (:func:`register_encoder`).

``mlflow.pytorch.log_model`` is the one MLflow call in ``tracking/`` that reads the global
tracking URI instead of taking a client: it is set for the duration of that call, under a lock,
so concurrent streams in one process (Tune trials) do not log each other's models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from streamssl.tracking.mlflow_store import flatten_params

log = logging.getLogger(__name__)

_GLOBAL_URI_LOCK = threading.Lock()


def load_encoder_default(checkpoint_dir: str) -> Any:
    """:func:`streamssl.load_encoder` (imported on first use: it pulls in torch and the SSL code)."""
    from streamssl import load_encoder

    return load_encoder(checkpoint_dir)


def log_encoder(client: MlflowClient, tracking_uri: str, experiment_id: str, run_id: str, model: Any,
                example_shape: Sequence[int], *, name: str = "encoder", serialization_format: str = "pt2") -> str:
    """Log a torch encoder as an MLflow model of run ``run_id``; returns its ``models:/`` URI.

    ``pt2`` (torch.export) needs no streamssl code and no unpickling to load, so it is tried first;
    modules torch.export cannot trace fall back to the pickle format with an inferred signature.
    The LoggedModel is created here, in the run's experiment, because ``log_model`` would
    otherwise put it in the global default experiment (and its artifacts in ``./mlruns``).
    """
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    example = np.zeros(tuple(example_shape), dtype=np.float32)
    pip = [f"torch=={torch.__version__.split('+')[0]}"]
    # The exported graph keeps only forward(): record how inputs must be normalized (FrozenEncoder's
    # input_spec) on the LoggedModel and in the MLmodel file, where a consumer will look for it.
    spec = getattr(model, "input_spec", None)
    info_meta: dict[str, Any] = {"input_spec": dataclasses.asdict(spec)} if dataclasses.is_dataclass(spec) else {}
    if hasattr(model, "feature_dim"):
        info_meta["feature_dim"] = int(model.feature_dim)
    info_meta = json.loads(json.dumps(info_meta, default=str))  # tuples -> lists: YAML-safe for MLmodel
    params = flatten_params(info_meta)
    with _GLOBAL_URI_LOCK, _use_tracking_uri(tracking_uri):
        if serialization_format == "pt2":
            lm = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="encoder",
                                            params=params)
            try:
                info = mlflow.pytorch.log_model(model, name=name, model_id=lm.model_id, run_id=run_id,
                                                input_example=example, pip_requirements=pip,
                                                serialization_format="pt2", metadata=info_meta or None)
                return info.model_uri
            except Exception as e:  # noqa: BLE001 - torch.export limitation: fall back to pickle
                log.warning("torch.export of the encoder failed (%s); logging it pickled", e)
                try:  # usually already FAILED by log_model itself
                    client.finalize_logged_model(lm.model_id, "FAILED")
                except MlflowException:
                    pass
        with torch.no_grad():
            out = model(torch.from_numpy(example))
        signature = infer_signature(example, out.detach().cpu().numpy())
        lm = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="encoder",
                                        params=params)
        info = mlflow.pytorch.log_model(model, name=name, model_id=lm.model_id, run_id=run_id, signature=signature,
                                        pip_requirements=pip, serialization_format="pickle",
                                        metadata=info_meta or None)
        return info.model_uri


def register_encoder(client: MlflowClient, tracking_uri: str, name: str, model_uri: str, run_id: str,
                     tags: dict[str, str]) -> ModelVersion:
    """Register the logged encoder ``model_uri`` (``models:/<model_id>``) as a new version of the
    registered model ``name`` (created on first use), with ``tags`` on the version.

    The client's calls rather than ``mlflow.register_model`` (which prints to stderr). MLflow's
    database store resolves a ``models:/`` source through the global tracking URI, so that is set
    for the call, as for ``log_model``. Needs a registry: a database-backed store or a server.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    try:
        client.create_registered_model(name, description="Encoders trained by streamssl streams; one version "
                                                          "per finished stream, tagged with its lineage.")
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/") else None
    with _GLOBAL_URI_LOCK, _use_tracking_uri(tracking_uri):
        return client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id)
