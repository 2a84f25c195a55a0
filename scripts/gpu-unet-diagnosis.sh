#!/usr/bin/env bash
# Where a U-Net training step spends its time on the GPU: per-piece timings (candle conv vs a backward
# of forward convolutions, forward and backward) and B5 step/sampling with both convolutions. Carry .carry/flowmatching-bench.gz
# (the gzipped cuda build). Writes $OUT/diag.jsonl.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
gzip -dc .carry/flowmatching-bench.gz > /tmp/fm-bench && chmod +x /tmp/fm-bench
O=$OUT/diag.jsonl
timeout 60 /tmp/fm-bench unet-parts --device cuda --batch 128 --iters 3 --warmup 1 | tee -a $O
for c in gemm-backward candle; do FLOWMATCHING_CONV=$c timeout 35 /tmp/fm-bench b5-step --device cuda --batch 128 --iters 5 --warmup 2 | tee -a $O; done
timeout 30 /tmp/fm-bench b5-sample --device cuda --batch 128 --iters 2 --warmup 1 | tee -a $O
