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

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


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


class StreamEvaluation:
    """The evaluation actor of one stream, started when first needed; its first call evaluates the
    reference rows (when ``eval.random_init_baseline``).

    An actor that reserves a GPU share (``eval.num_gpus`` > 0) is started when the first segment
    has been trained, so the training workers already hold their GPUs: it takes what they leave
    and can never keep the worker group from being placed (Ray places a fractional GPU request on
    one GPU, and an actor placed first could split the GPUs so that no worker fits). A CPU-only
    actor is started with the stream, so the reference rows are evaluated while segment 0 trains.
    """

    def __init__(self, config: dict[str, Any], run_dir: str, num_cpus: float, num_gpus: float,
                 references: bool) -> None:
        self.config, self.run_dir = config, run_dir
        self.num_cpus, self.num_gpus, self.with_references = num_cpus, num_gpus, references
        self.actor: Any = None
        self.references: Any = None  # ObjectRef of the reference rows' evaluation

    def start(self) -> Any:
        if self.actor is None:
            self.actor = start_evaluator(self.num_cpus, self.num_gpus)
            if self.with_references:
                self.references = self.actor.references.remote(self.config, self.run_dir)
        return self.actor

    def evaluate(self, *args: Any) -> Any:
        """``_Evaluator.evaluate(config, ckpt, plan_meta, segment, prev)`` on the actor: an ObjectRef."""
        return self.start().evaluate.remote(self.config, *args)

    def wait_for_references(self) -> None:
        """The reference rows, evaluated (in the run directory then); a failure is a warning: the
        stream's own results stand without them."""
        if self.references is None:
            return
        import ray

        try:
            _, seconds = ray.get(self.references)
            log.info("reference rows (raw pixels, random init) ready, %.1f s on the evaluation actor", seconds)
        except Exception as e:  # noqa: BLE001 (reported, not fatal)
            log.warning("reference rows (raw pixels, random init) were not evaluated: %s", e)

    def close(self) -> None:
        if self.actor is not None:
            import ray

            ray.kill(self.actor)
            self.actor = None


def start_evaluator(num_cpus: float = 0.0, num_gpus: float = 0.0) -> Any:
    """A new evaluator actor (a handle whose ``evaluate.remote(...)`` returns an ObjectRef)."""
    import ray

    # Every call is idempotent (it reads a published checkpoint, writes only caches): an actor
    # whose node is lost is restarted elsewhere and its calls retried.
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=3,
                      max_task_retries=3)(_Evaluator).remote()
