#!/usr/bin/env bash
# Builds `flowmatching` with the `cuda` feature on a machine with no CUDA installed: the CUDA 13.0 toolkit
# from PyPI wheels in .cuda-venv/, link-time symlinks for the versioned libraries, and a stub libcuda.so
# for the linker (the real driver is loaded at run time).
#
#   scripts/build-cuda.sh            -> target-cuda/release/flowmatching (compute capability 9.0: H100/H200)
#   scripts/build-cuda.sh --cudnn    -> target-cuda/release/flowmatching-cudnn: convolutions through cuDNN
#                                       (PyPI's nvidia-cudnn-cu13 to link; at run time libcudnn.so.9 must
#                                       be on LD_LIBRARY_PATH: the GPU machine's PyTorch has one)
#
# About 30 minutes cold on 2 cores (nvcc compiles candle-kernels); keep target-cuda/ between runs. Not part
# of CI. To run the binary on the GPU machine: LD_LIBRARY_PATH=/usr/local/cuda/lib64 (libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10 and the driver's libcuda.so.1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cuda-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
  "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
CU=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
for lib in cublas cublasLt cudart nvrtc; do ln -sf "lib$lib.so.13" "$CU/lib/lib$lib.so"; done
ln -sf libcurand.so.10 "$CU/lib/libcurand.so"

# A libcuda.so.1 stub defining every cu* function that cudarc declares, for the linker only.
cargo fetch -q
SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys | head -n 1)
STUB=$(mktemp -d)
grep -ohE "fn cu[A-Za-z0-9_]+" "$SYS"/*.rs | sort -u | sed 's/^fn \(.*\)$/void \1(void) {}/' > "$STUB/stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/libcuda.so" "$STUB/stub.c"
rm -rf "$STUB"

export NVCC="$CU/bin/nvcc" CUDA_HOME="$CU" CUDA_ROOT="$CU" CUDA_PATH="$CU" PATH="$CU/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$CU/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CU/lib"
FEATURES=cuda
if [ "${1:-}" = "--cudnn" ]; then
  "$VENV/bin/pip" install -q "nvidia-cudnn-cu13==9.*"
  CUDNN=$("$VENV/bin/python" -c "import nvidia.cudnn; print(list(nvidia.cudnn.__path__)[0])")
  ln -sf libcudnn.so.9 "$CUDNN/lib/libcudnn.so"
  # LIBRARY_PATH only: a different RUSTFLAGS would rebuild everything, candle-kernels included.
  export LIBRARY_PATH="$CUDNN/lib:$LIBRARY_PATH"
  FEATURES=cudnn
fi
# Both variants share target-cuda/ (candle-kernels, the slow part, does not depend on the feature).
cargo build --release -p flowmatching-cli -p flowmatching-bench --features "$FEATURES" --target-dir target-cuda
BIN=target-cuda/release/flowmatching
# Each command binary X has its benchmark binary beside it as X-bench.
if [ "$FEATURES" = cudnn ]; then
  cp "$BIN" "$BIN-cudnn"
  cp "$BIN-bench" "$BIN-cudnn-bench"
  # Put the plain build back under its own name (cargo keeps both variants' artifacts: no recompiling).
  cargo build --release -p flowmatching-cli -p flowmatching-bench --features cuda --target-dir target-cuda
  strip "$BIN" "$BIN-bench"
  BIN="$BIN-cudnn"
fi
strip "$BIN" "$BIN-bench"
ls -la "$BIN" "$BIN-bench"
