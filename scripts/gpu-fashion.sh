#!/usr/bin/env bash
# The Fashion-MNIST run on one GPU (H100/H200), from the repository root, time-boxed to TOTAL_SECONDS:
#
#   scripts/gpu-fashion.sh [TOTAL_SECONDS]        (default 560, to fit a 600-second limit)
#
# Needs, copied from the build machine: the `cuda` binary (scripts/build-cuda.sh ->
# target-cuda/release/flowmatching, about 53 MB, gzipped as .carry/flowmatching.gz to keep the copy
# under 64 MiB), Fashion-MNIST's four IDX files in .carry/fashion-mnist/ (copied from
# /usr/share/datasets/fashion-mnist) and the evaluation classifier in .carry/classifier.safetensors
# (`flowmatching classifier train --out .carry/classifier.safetensors`, on the CPU).
#
# Phases, each given what is left of TOTAL_SECONDS:
# 1. Probe: 20 steps (loads the CUDA kernels), 40 more timed steps, at batch 256, and at 128 when 256
#    leaves fewer than MIN_STEPS steps; on failure, once more with the fallback settings below.
# 2. Training sized from the probe's step time to what is left minus EVAL_RESERVE seconds (cosine
#    schedule over exactly that many steps; --max-minutes as a safety net).
# 3. image-eval at w = 2 on 10,000 samples (FD and class accuracy: the two image targets).
# 4. B5 benchmark, ours against the same U-Net in PyTorch eager (bench/peer_unet.py), time-boxed.
# 5. image-eval at w = 0, 1, 4 and bits/dim of the test set, with what is left.
# Everything lands in $OUT/fashion.tar.gz plus $OUT/log.txt and $OUT/bench.jsonl (three files).
set -uo pipefail
T0=$(date +%s)
TOTAL=${1:-560}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# The cuDNN build (scripts/build-cuda.sh --cudnn), carried as .carry/flowmatching-cudnn.gz, runs with the
# libcudnn.so.9 of the machine's PyTorch; otherwise the plain build.
CUDNN_LIB=$(python3 -c "import nvidia.cudnn; print(list(nvidia.cudnn.__path__)[0] + '/lib')" 2>/dev/null)
if [ -z "${BIN:-}" ] && [ -f .carry/flowmatching-cudnn.gz ] && [ -n "$CUDNN_LIB" ]; then
  export LD_LIBRARY_PATH=$CUDNN_LIB:$LD_LIBRARY_PATH
  gzip -dc .carry/flowmatching-cudnn.gz > /tmp/flowmatching && chmod +x /tmp/flowmatching && BIN=/tmp/flowmatching
  gzip -dc .carry/flowmatching-cudnn-bench.gz > /tmp/flowmatching-bench && chmod +x /tmp/flowmatching-bench
fi
if [ -z "${BIN:-}" ] && [ -f .carry/flowmatching.gz ]; then
  gzip -dc .carry/flowmatching.gz > /tmp/flowmatching && chmod +x /tmp/flowmatching && BIN=/tmp/flowmatching
  gzip -dc .carry/flowmatching-bench.gz > /tmp/flowmatching-bench && chmod +x /tmp/flowmatching-bench
fi
BIN=${BIN:-target-cuda/release/flowmatching}
# The benchmark workloads: the binary beside the command, as X-bench.
BENCH_BIN=${BENCH_BIN:-$BIN-bench}
DATA=${DATA:-.carry/fashion-mnist}
CLF=${CLF:-.carry/classifier.safetensors}
OUT=${OUT:-/tmp/fm-out}
# Overridable for a dry run on the CPU: DEVICE=cpu BATCH=8 NS=200 NLL=20 scripts/gpu-fashion.sh 120
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-tiny}
BATCH=${BATCH:-256}
LR=${LR:-1e-3}
NS=${NS:-10000}
NLL=${NLL:-1000}
EVAL_RESERVE=${EVAL_RESERVE:-230}
W=/tmp/fm-gpu
rm -rf "$W"
mkdir -p "$W/keep" "$OUT"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
say() { echo "== $(date -u +%H:%M:%S) [$(left) s left] $*"; }
pack() { tar -czf "$OUT/fashion.tar.gz" -C "$W/keep" . 2>/dev/null; }
die() { say "FAILED: $*"; pack; exit 1; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
TRAIN=(train --data fashion-mnist --data-dir "$DATA" --device "$DEVICE" --unet "$PRESET"
  --lr "$LR" --warmup 200 --ema-decay 0.999 --grad-clip 1)

# The probe: 20 steps load the kernels, 40 more are timed ("done: 60 steps in S s" times those 40).
probe() {
  rm -rf "$W/probe"
  "$BIN" "${TRAIN[@]}" --batch-size "$1" --out "$W/probe" --steps 20 --checkpoint-every 0 >&2 &&
  "$BIN" "${TRAIN[@]}" --batch-size "$1" --out "$W/probe" --steps 60 --resume --checkpoint-every 0 2>&1 \
    | tee "$W/probe.txt" >&2 &&
  sed -nE 's/.*done: 60 steps in ([0-9.]+) s.*/\1/p' "$W/probe.txt" | head -n 1
}
say "probe at batch $BATCH"
SEC=$(probe "$BATCH" | tail -n 1)
if ! [[ "$SEC" =~ ^[0-9.]+$ ]]; then
  # Fallback settings: candle's convolution, cudarc's defaults.
  say "probe failed; retrying with FLOWMATCHING_CONV=candle and cudarc's event tracking and pool defaults"
  export FLOWMATCHING_CONV=candle FLOWMATCHING_CUDA_EVENTS=1 FLOWMATCHING_CUDA_POOL_RELEASE=1
  SEC=$(probe "$BATCH" | tail -n 1)
  [[ "$SEC" =~ ^[0-9.]+$ ]] || die "probe"
fi
BUDGET=$(( $(left) - EVAL_RESERVE ))
[ "$BUDGET" -gt 10 ] || die "no time left to train"
STEPS=$(python3 -c "print(int($BUDGET / ($SEC / 40) * 0.95))")
if [ "$STEPS" -lt "${MIN_STEPS:-4000}" ] && [ "$BATCH" -gt 128 ]; then
  # Compute-bound at this batch: half the batch buys about twice the steps.
  BATCH=128
  say "probe: $SEC s for 40 steps gives only $STEPS steps; probing batch $BATCH"
  SEC=$(probe "$BATCH" | tail -n 1)
  [[ "$SEC" =~ ^[0-9.]+$ ]] || die "probe at batch $BATCH"
  BUDGET=$(( $(left) - EVAL_RESERVE ))
  STEPS=$(python3 -c "print(int($BUDGET / ($SEC / 40) * 0.95))")
fi
TRAIN+=(--batch-size "$BATCH")
say "probe: $SEC s for 40 steps at batch $BATCH -> $STEPS steps in $BUDGET s"

say "training $STEPS steps"
START=$(date +%s)
"$BIN" "${TRAIN[@]}" --out "$W/run" --steps "$STEPS" --checkpoint-every 2000 \
  --max-minutes "$(python3 -c "print(($BUDGET + 15) / 60)")" || die "training"
TRAINED=$(( $(date +%s) - START ))
say "trained in $TRAINED s"
cp "$W/run/checkpoint.json" "$W/keep/"
pack

EVAL=(image-eval --checkpoint "$W/run" --classifier "$CLF" --data-dir "$DATA" --device "$DEVICE"
  --solver midpoint --steps "${EVAL_STEPS:-20}" --batch 1000)
say "evaluation at w = 2 ($NS samples)"
timeout $(( $(left) - 20 )) "$BIN" "${EVAL[@]}" --num-samples "$NS" --guidance 2 --out "$W/keep/eval-w2" \
  || say "evaluation at w = 2 did not finish"
pack

if [ "${BENCH:-1}" = 1 ] && [ "$DEVICE" = cuda ] && [ "$(left)" -gt 90 ]; then
  say "B5 benchmark: ours and PyTorch eager, batch 128"
  B=$OUT/bench.jsonl
  for round in 1 2; do
    timeout 25 "$BENCH_BIN" b5-step --device cuda --batch 128 --iters 10 --warmup 3 | tee -a "$B"
    timeout 25 python3 bench/peer_unet.py b5-step --batch 128 --iters 10 --warmup 3 | tee -a "$B"
  done
  timeout 20 "$BENCH_BIN" b5-step --device cuda --batch 128 --unet tiny --iters 10 --warmup 3 | tee -a "$B"
  timeout 20 python3 bench/peer_unet.py b5-step --batch 128 --unet tiny --iters 10 --warmup 3 | tee -a "$B"
  FLOWMATCHING_CUDA_EVENTS=1 timeout 20 "$BENCH_BIN" b5-step --device cuda --batch 128 --iters 5 --warmup 2 \
    | tee -a "$B"
  FLOWMATCHING_CONV=candle timeout 20 "$BENCH_BIN" b5-step --device cuda --batch 128 --iters 5 --warmup 2 \
    | tee -a "$B"
  timeout 20 "$BENCH_BIN" b5-sample --device cuda --batch 128 --iters 3 --warmup 1 | tee -a "$B"
  timeout 20 python3 bench/peer_unet.py b5-sample --batch 128 --iters 3 --warmup 1 | tee -a "$B"
fi

if [ "$(left)" -gt 60 ]; then
  say "evaluation at w = 0, 1, 4"
  timeout $(( $(left) - 25 )) "$BIN" "${EVAL[@]}" --num-samples "$NS" --guidance 0,1,4 \
    --out "$W/keep/eval-w014" || say "evaluation at w = 0, 1, 4 did not finish"
  pack
fi
if [ "$(left)" -gt 20 ]; then
  say "bits/dim"
  timeout $(( $(left) - 8 )) "$BIN" likelihood --checkpoint "$W/run" --data fashion-mnist:test \
    --data-dir "$DATA" --device "$DEVICE" --num-samples "$NLL" --batch-size 500 --hutchinson 1 \
    --out "$W/keep/likelihood.json" && cat "$W/keep/likelihood.json"
fi
pack
say "done (trained $STEPS steps in $TRAINED s)"
