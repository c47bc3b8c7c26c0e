"""After-segment evaluation as a Ray actor, off the training path.

The stream driver hands each finished segment's checkpoint to one :class:`Evaluator` actor kept
for the whole stream (imports, the dataset's metadata and Ray Data's start-up are paid once),
and goes on: the workers already train the next segment while the actor encodes the probe's
train and test images and fits the probes. Results come back in segment order. The actor's
reserved resources are ``eval.num_cpus`` / ``eval.num_gpus``.

The stream's reference rows (raw pixels and random init, :mod:`streamssl.evaluate.random_init`)
are evaluated by the same actor, submitted before segment 0's evaluation: the actor runs its calls
in order, so they are cached in the run directory while segment 0 trains and before any segment is
recorded, and nothing slow runs in the driver, whose loop reads the stream's messages.
"""

from __future__ import annotations

import time
from typing import Any


class _Evaluator:
    def evaluate(self, config: dict[str, Any], ckpt: str, plan_meta: dict[str, Any], segment: int,
                 prev: str | None) -> tuple[dict[str, float], dict[str, list[float]], float]:
        from ray.data import DataContext

        from streamssl.config import Config
        from streamssl.evaluate.after_segment import evaluate_checkpoint

        DataContext.get_current().execution_options.preserve_order = True  # as in the driver
        t0 = time.perf_counter()
        metrics, row = evaluate_checkpoint(Config.model_validate(config), ckpt, plan_meta, segment, prev_ckpt=prev)
        return metrics, row, time.perf_counter() - t0

    def references(self, config: dict[str, Any], run_dir: str) -> tuple[dict[str, dict[str, float]], float]:
        """Both reference rows of the run directory, evaluated unless cached (then cached)."""
        from ray.data import DataContext

        from streamssl.config import Config
        from streamssl.evaluate.random_init import reference_metrics

        DataContext.get_current().execution_options.preserve_order = True
        t0 = time.perf_counter()
        refs = reference_metrics(Config.model_validate(config), run_dir)
        return refs, time.perf_counter() - t0


def start_evaluator(num_cpus: float = 0.0, num_gpus: float = 0.0) -> Any:
    """A new evaluator actor (a handle whose ``evaluate.remote(...)`` returns an ObjectRef)."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_Evaluator).remote()
