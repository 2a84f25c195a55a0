#!/usr/bin/env bash
# B1 on a GPU (H100/H200): ours (a `cuda` build from scripts/build-cuda.sh, copied to
# target-cuda/release/flowmatching-bench) and PyTorch's, interleaved, three rounds. Needs the flow_matching
# wheel in .whl/ and a python3 with torch, torchdiffeq, safetensors and tqdm. Writes $OUT/gpu-b1.jsonl.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
OURS=target-cuda/release/flowmatching-bench
OUTF=${OUT:-/tmp}/gpu-b1.jsonl
for round in 1 2 3; do
  timeout 120 "$OURS" b1 --device cuda --iters 50 --warmup 10 | tee -a "$OUTF"
  timeout 120 python3 bench/peers.py b1 --device cuda --iters 50 --warmup 10 | tee -a "$OUTF"
done
