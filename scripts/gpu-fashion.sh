#!/usr/bin/env bash
# The prepared Fashion-MNIST run for one lent GPU (H100/H200), from the repository root:
#
#   scripts/gpu-fashion.sh [TRAIN_SECONDS]        (default 300)
#
# Needs, carried from the CPU machine: the `cuda` binary (scripts/build-cuda.sh ->
# target-cuda/release/flowmatching, about 53 MB, so carried gzipped as .carry/flowmatching.gz to stay
# under the 64 MiB the device tool carries), Fashion-MNIST's four IDX files in .carry/fashion-mnist/ (copied from
# /usr/share/datasets/fashion-mnist) and the evaluation classifier in .carry/classifier.safetensors
# (`flowmatching classifier train --out .carry/classifier.safetensors`, on the CPU).
#
# 1. A probe: 10 steps (loads the CUDA kernels), 40 timed steps, a guided sample and a small evaluation,
#    so a CUDA-only failure stops the script within a minute.
# 2. Training sized to TRAIN_SECONDS from the probe's step time (cosine schedule over exactly that many
#    steps; --max-minutes as a safety net).
# 3. image-eval: FD of 10,000 samples per guidance weight w in {0, 1, 2, 4}, class accuracy, grids.
# 4. Bits/dim of 1,000 test images (Hutchinson, one probe), time-boxed.
# Results land in $OUT (8 files at most come back): report.md, results.json, four grids, the Gaussian
# grid and log.txt.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
if [ -z "${BIN:-}" ] && [ -f .carry/flowmatching.gz ]; then
  gzip -dc .carry/flowmatching.gz > /tmp/flowmatching && chmod +x /tmp/flowmatching && BIN=/tmp/flowmatching
fi
BIN=${BIN:-target-cuda/release/flowmatching}
DATA=${DATA:-.carry/fashion-mnist}
CLF=${CLF:-.carry/classifier.safetensors}
OUT=${OUT:-/tmp/fm-out}
BUDGET=${1:-300}
# Overridable for a dry run on the CPU: DEVICE=cpu PRESET=tiny BATCH=8 NS=1000 NLL=20 scripts/gpu-fashion.sh 5
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-small}
BATCH=${BATCH:-256}
NS=${NS:-10000}
NLL=${NLL:-1000}
W=/tmp/fm-gpu
rm -rf "$W"
mkdir -p "$W" "$OUT"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
say() { echo "== $(date -u +%H:%M:%S) $*"; }
die() { say "FAILED: $*"; exit 1; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
TRAIN=(train --data fashion-mnist --data-dir "$DATA" --device "$DEVICE" --unet "$PRESET" --batch-size "$BATCH"
  --lr 5e-4 --warmup 300 --ema-decay 0.999 --grad-clip 1)

say "probe: kernel loading"
"$BIN" "${TRAIN[@]}" --out "$W/probe" --steps 10 --checkpoint-every 0 || die "probe training"
say "probe: 40 timed steps"
"$BIN" "${TRAIN[@]}" --out "$W/probe" --steps 50 --resume --checkpoint-every 0 2>&1 | tee "$W/probe.txt" \
  || die "probe resume"
SEC=$(sed -nE 's/.*done: 50 steps in ([0-9.]+) s.*/\1/p' "$W/probe.txt" | head -n 1)
[ -n "$SEC" ] || die "no probe timing"
STEPS=$(python3 -c "print(int($BUDGET / ($SEC / 40)))")
say "probe: $SEC s for 40 steps -> $STEPS steps in $BUDGET s"
"$BIN" sample --checkpoint "$W/probe" --device "$DEVICE" --num-samples 20 --guidance 2 --steps 2 \
  --out "$W/probe.npy" --grid "$W/probe.png" || die "probe sampling"
"$BIN" image-eval --checkpoint "$W/probe" --classifier "$CLF" --data-dir "$DATA" --device "$DEVICE" \
  --num-samples "${NPROBE:-1000}" --guidance 2 --steps 2 --out "$W/probe-eval" > /dev/null || die "probe evaluation"

say "training $STEPS steps"
START=$(date +%s)
"$BIN" "${TRAIN[@]}" --out "$W/run" --steps "$STEPS" --checkpoint-every 2000 \
  --max-minutes "$(python3 -c "print($BUDGET / 60 + 1)")" || die "training"
say "trained in $(( $(date +%s) - START )) s"

say "evaluation"
"$BIN" image-eval --checkpoint "$W/run" --classifier "$CLF" --data-dir "$DATA" --device "$DEVICE" \
  --num-samples "$NS" --guidance 0,1,2,4 --solver midpoint --steps "${EVAL_STEPS:-20}" --batch 1000 --out "$W/eval" \
  || die "evaluation"
cp "$W/eval/report.md" "$W/eval/results.json" "$W"/eval/samples-w*.png "$W/eval/gaussian.png" "$OUT/"

say "bits/dim"
timeout 45 "$BIN" likelihood --checkpoint "$W/run" --data fashion-mnist:test --data-dir "$DATA" \
  --device "$DEVICE" --num-samples "$NLL" --batch-size 500 --hutchinson 1 --out "$W/likelihood.json" \
  && cat "$W/likelihood.json"
grep -h '"step"\|"loss"' "$W/run/checkpoint.json"
say "done"
