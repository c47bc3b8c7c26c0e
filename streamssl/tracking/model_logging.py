"""The stream's final encoder as an MLflow model (a LoggedModel of the stream run).

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

from mlflow.exceptions import MlflowException
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
