"""Frozen-feature evaluation (kNN, linear probe, few-shot), continual metrics, CKA, sharpness.

Importing this package does not import Ray; only :func:`extract_features` needs it.
"""

from .cka import cka_between_encoders, linear_cka
from .continual_metrics import (
    accuracy_matrix_row,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    continual_summary,
    forward_transfer,
)
from .features import FeatureSet, extract_features, extract_features_local, split_parts
from .fewshot import FewShotResult, fewshot_eval
from .knn import KNNResult, knn_classify
from .linear import LinearModel, LinearProbeResult, fit_logistic, linear_probe
from .runner import evaluate_encoder, evaluate_features
from .sharpness import SharpnessResult, estimate_sharpness

__all__ = [
    "FeatureSet",
    "FewShotResult",
    "KNNResult",
    "LinearModel",
    "LinearProbeResult",
    "SharpnessResult",
    "accuracy_matrix_row",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "cka_between_encoders",
    "continual_summary",
    "estimate_sharpness",
    "evaluate_encoder",
    "evaluate_features",
    "extract_features",
    "extract_features_local",
    "split_parts",
    "fewshot_eval",
    "fit_logistic",
    "forward_transfer",
    "knn_classify",
    "linear_cka",
    "linear_probe",
]
