"""Messages from a Ray Train run's rank 0 to the stream driver, while the run is in flight.

One ``TorchTrainer.fit()`` trains several segments, and the driver must act on each as soon as it
ends (publish its checkpoint, evaluate it, log it, report it to Tune) rather than when the whole
run returns. Rank 0 puts small dicts on a Ray queue (an actor holding no CPU):

* ``{"kind": "start", "segment": t, "setup_s": ...}``: segment t began training;
* ``{"kind": "steps", "segment": t, "records": [...]}``: per-step records (loss, lr, ...);
* ``{"kind": "end", "segment": t, "checkpoint": NAME, "metrics": {...}}``: segment t's final
  checkpoint was reported to Ray Train as ``NAME`` in the run's storage.

After a worker failure a segment's start and end may arrive twice; the driver keeps the first.
``put`` returns once the queue actor holds the message, so every message of a run is queued before
its ``fit()`` returns: a driver that sees the run over and then drains the queue has read them all.
The queue actor lives on the driver's node, so losing any other node loses no message.
"""

from __future__ import annotations

from queue import Empty
from typing import Any


class SegmentChannel:
    def __init__(self) -> None:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a cluster that loses a worker node must not lose the queue (the
        # driver's own node going away ends the stream anyway).
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def put(self, message: dict[str, Any]) -> None:
        self._queue.put(message)

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None when none arrives within ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except Empty:
            return None

    def drain(self) -> list[dict[str, Any]]:
        """Every message queued now, in order, without waiting."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except Empty:
                return out

    def close(self) -> None:
        self._queue.shutdown()
