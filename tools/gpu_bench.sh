#!/usr/bin/env bash
# The speed benchmark on a CUDA GPU, budgeted for under 5 minutes (not yet timed on one): for the device tool's machine or a Colab
# GPU runtime. Installs the pinned requirements if torch is missing, then runs
# benchmarks/bench_train.py --device cuda with a 5-second budget per run (MNIST; 15 s table
# tennis). Results: benchmarks/results/bench_train_cuda.json and figures/*_cuda.png
# (copied to $OUT when that is set, as the device tool expects).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch, torchvision, mlxtend, ale_py" 2>/dev/null || "$PY" -m pip install -q -r requirements.txt
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.__version__, torch.cuda.get_device_name())"
"$PY" benchmarks/bench_train.py --device cuda --budget 5 --groups tradeoff pipeline cpu "$@"
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/bench_train_cuda.json figures/*_cuda.png "$OUT"/
fi
