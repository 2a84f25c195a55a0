#!/usr/bin/env bash
# GPU benchmarks and the Fashion-MNIST ablation on one H100/H200, from the repository root, time-boxed
# to TOTAL_SECONDS:
#
#   scripts/gpu-ablate.sh [TOTAL_SECONDS]        (default 560, to fit a 600-second limit)
#
# 1. B5 three ways, batch 128: the plain `cuda` build, the cuDNN build (scripts/build-cuda.sh --cudnn, run
#    with the libcudnn.so.9 of the machine's PyTorch) and PyTorch eager (bench/peer_unet.py).
#    Then B1 on the GPU, ours and flow_matching's (bench/peers.py; the wheel in .whl/).
# 2. The five-way ablation on Fashion-MNIST (`ablate --data fashion-mnist`, default image preset) with the
#    faster build, time-boxed to what is left.
# Needs .carry/ holding flowmatching.gz and flowmatching-cudnn.gz (gzip of target-cuda/release/flowmatching
# and flowmatching-cudnn, about 15 MB each), fashion-mnist/ (the four IDX files) and
# classifier.safetensors, and .whl/ (the flow_matching wheel, 52 KB): about 63 MiB together with the
# tracked files.
# Results: $OUT/bench.jsonl, $OUT/log.txt and $OUT/ablation.tar.gz (report.md, results.json, PNGs).
set -uo pipefail
T0=$(date +%s)
TOTAL=${1:-560}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
OUT=${OUT:-/tmp/fm-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
say() { echo "== $(date -u +%H:%M:%S) [$(left) s left] $*"; }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
CUDNN_LIB=$(python3 -c "import nvidia.cudnn; print(list(nvidia.cudnn.__path__)[0] + '/lib')" 2>/dev/null)
say "cuDNN library: ${CUDNN_LIB:-none}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
gzip -dc .carry/flowmatching.gz > /tmp/fm && chmod +x /tmp/fm
# Each command binary X has its benchmark binary as X-bench (.carry/flowmatching-bench.gz, ...).
gzip -dc .carry/flowmatching-bench.gz > /tmp/fm-bench && chmod +x /tmp/fm-bench
BINS=(/tmp/fm)
if [ -f .carry/flowmatching-cudnn.gz ] && [ -n "$CUDNN_LIB" ]; then
  gzip -dc .carry/flowmatching-cudnn.gz > /tmp/fm-cudnn && chmod +x /tmp/fm-cudnn && BINS+=(/tmp/fm-cudnn)
  gzip -dc .carry/flowmatching-cudnn-bench.gz > /tmp/fm-cudnn-bench && chmod +x /tmp/fm-cudnn-bench
fi
B=$OUT/bench.jsonl
best=/tmp/fm
best_ms=1e9
for bin in "${BINS[@]}"; do
  say "B5 step with $bin"
  line=$(LD_LIBRARY_PATH=$CUDNN_LIB:$LD_LIBRARY_PATH timeout 60 "$bin-bench" b5-step --device cuda --batch 128 \
    --unet tiny --iters 10 --warmup 3 | tail -n 1)
  echo "$line" | tee -a "$B"
  ms=$(echo "$line" | python3 -c "import json,sys; print(json.load(sys.stdin)['median_ms'])" 2>/dev/null)
  if [ -n "$ms" ] && python3 -c "import sys; sys.exit(not ($ms < $best_ms))"; then best=$bin; best_ms=$ms; fi
  LD_LIBRARY_PATH=$CUDNN_LIB:$LD_LIBRARY_PATH timeout 60 "$bin-bench" b5-step --device cuda --batch 128 \
    --iters 10 --warmup 3 | tee -a "$B"
  LD_LIBRARY_PATH=$CUDNN_LIB:$LD_LIBRARY_PATH timeout 60 "$bin-bench" b5-sample --device cuda --batch 128 \
    --iters 3 --warmup 1 | tee -a "$B"
done
# B1 on the GPU, ours and the peer's (as bench/gpu.sh); the peer needs the flow_matching wheel in .whl/.
if ls .whl/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; then
  for round in 1 2; do
    timeout 60 /tmp/fm-bench b1 --device cuda --iters 50 --warmup 10 | tee -a "$B"
    PYTHONPATH=/tmp/site timeout 60 python3 bench/peers.py b1 --device cuda --iters 50 --warmup 10 | tee -a "$B"
  done
fi
timeout 40 python3 bench/peer_unet.py b5-step --batch 128 --unet tiny --iters 10 --warmup 3 | tee -a "$B"
timeout 40 python3 bench/peer_unet.py b5-step --batch 128 --iters 10 --warmup 3 | tee -a "$B"
timeout 40 python3 bench/peer_unet.py b5-sample --batch 128 --iters 3 --warmup 1 | tee -a "$B"
say "ablation with $best ($best_ms ms per tiny step)"
LD_LIBRARY_PATH=$CUDNN_LIB:$LD_LIBRARY_PATH timeout $(( $(left) - 15 )) "$best" ablate --data fashion-mnist \
  --data-dir .carry/fashion-mnist --classifier .carry/classifier.safetensors --device cuda --out /tmp/ablation \
  || say "the ablation did not finish"
rm -rf /tmp/ablation/checkpoints
tar -czf "$OUT/ablation.tar.gz" -C /tmp ablation 2>/dev/null
say "done"
