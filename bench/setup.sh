#!/usr/bin/env bash
# Makes bench/.venv with the PyTorch peers: torch, Meta's flow_matching and torchdiffeq, and POT for the
# OT benchmark (CPU use; the PyPI torch wheel also carries CUDA libraries, which the CPU benchmarks do
# not touch).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.11.0" "flow_matching==1.0.10" "torchdiffeq==0.2.5" "POT==0.9.7" "safetensors==0.7.0" packaging tqdm numpy "matplotlib==3.10.7"
.venv/bin/python -c "import torch, flow_matching, torchdiffeq; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
