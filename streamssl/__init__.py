"""streamssl: continual self-supervised pre-training of image encoders on streaming data, on Ray.

Heavy dependencies (torch, Ray, DeepSpeed, MLflow) are imported lazily by the parts that need
them, so ``import streamssl`` and ``streamssl --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_encoder", "__version__"]


def load_encoder(path: Any) -> Any:
    """Frozen encoder from a run dir, a segment checkpoint, or an exported file (see export.py)."""
    from streamssl.export import load_encoder as _load

    return _load(path)
