"""One tiny stream on a fresh local Ray cluster with logical GPUs, GPU compute switched off.

Run as ``python -m tests.eval_placement_run CONFIG.yaml NUM_GPUS OUT.json`` by
tests/test_eval_placement.py (a cluster with GPUs needs a process of its own: the test session
shares a CPU-only one). It records, in arrival order, the driver's callbacks (rank 0's step
batches, each segment's end, which waits for that segment's evaluation) and the lowest number
of free logical GPUs seen while the stream ran.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

os.environ["STREAMSSL_COMPUTE_DEVICE"] = "cpu"  # inherited by every Ray worker started below


def main(config_path: str, num_gpus: float, out_path: str) -> None:
    import ray

    from streamssl.config import load_config
    from streamssl.train.callbacks import StreamCallback
    from streamssl.train.driver import StreamRunner

    ray.init(address="local", num_cpus=2, num_gpus=num_gpus, include_dashboard=False, configure_logging=False,
             object_store_memory=400 << 20)
    events: list[list[Any]] = []
    lowest_free = [float(num_gpus)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            lowest_free[0] = min(lowest_free[0], float(ray.available_resources().get("GPU", 0.0)))

    class Record(StreamCallback):
        def on_train_steps(self, ctx: Any, segment: int, records: list[dict[str, Any]]) -> None:
            events.append(["steps", segment, max(int(r["step"]) for r in records), time.time()])

        def on_segment_end(self, ctx: Any, result: Any) -> None:
            events.append(["end", result.segment, None, time.time()])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = load_config(config_path, [])
    results = StreamRunner(cfg, cfg.run_dir, callbacks=[Record()]).run()
    stop.set()
    with open(out_path, "w") as f:
        json.dump({"events": events, "lowest_free_gpus": lowest_free[0],
                   "metrics": [r.metrics for r in results]}, f)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
