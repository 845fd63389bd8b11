#!/usr/bin/env bash
# One script, under 5 minutes on a GPU machine: install lineage beside the
# machine's CUDA torch, then verify the GPU fit equals the CPU fit within
# 1e-6 relative and time both.   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pip install -q --no-deps -e . 2>/dev/null || export PYTHONPATH="$PWD"
python3 -m pip install -q safetensors pyarrow 2>/dev/null || true
timeout 280 python3 -m benchmarks.gpu_check "$@"
