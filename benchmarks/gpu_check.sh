#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA GPU (run from the repository root after
# ./dev.sh has built the virtualenv and data/fashion-mnist exists):
#   1. a 2-segment stream on CUDA with NCCL and bf16 (scaling.use_gpu=true scaling.precision=bf16),
#      evaluated after each segment;
#   2. training throughput of the full path vs the bare PyTorch loop, both on the GPU in bf16;
#   3. the per-segment overhead benchmark (one Ray Train run per stream vs per segment) on the GPU.
# Each step's output goes to $OUT (default ./gpu-check) and is summarized at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
GPU=(scaling.use_gpu=true scaling.precision=bf16 scaling.num_workers=1 scaling.cpus_per_worker=4 eval.num_gpus=0)

echo "== 1. 2-segment stream, CUDA + NCCL + bf16"
"$PY" -m streamssl.cli train configs/fashion_mnist_class_incremental.yaml --run-dir "$OUT/stream" \
  stream.segments=2 stream.max_images_per_segment=6000 tracking.enabled=false "${GPU[@]}" \
  2>&1 | tee "$OUT/stream.log" | tail -20
"$PY" - "$OUT/stream" <<'PY'
import json, sys
doc = json.load(open(f"{sys.argv[1]}/results.json"))
for s in doc["segments"]:
    m = s["metrics"]
    print(f"segment {s['segment']}: loss {m['train/loss']:.3f}, {m['train/images_per_s']:.0f} img/s, "
          f"knn {m.get('eval/knn_acc', float('nan')):.3f}, linear {m.get('eval/linear_acc', float('nan')):.3f}, "
          f"fit {m['time/fit_s']:.1f}s, overhead {m['time/overhead_s']:.1f}s")
PY

echo "== 2. throughput vs the bare loop (GPU, bf16)"
"$PY" benchmarks/bench_train_throughput.py --gpu --workers 1 --steps 200 2>&1 | tee "$OUT/throughput.log" | tail -8

echo "== 3. per-segment overhead (GPU)"
"$PY" benchmarks/bench_segment_overhead.py --images 6000 "${GPU[@]}" 2>&1 | tee "$OUT/overhead.log" | tail -6
