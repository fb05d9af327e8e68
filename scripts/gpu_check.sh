#!/usr/bin/env bash
# The GPU path on a machine with an NVIDIA GPU, in one go:
#   1. install the pinned stack into .venv-gpu with the CUDA build of fbgemm (scripts/install.sh picks
#      fbgemm-gpu instead of fbgemm-gpu-cpu when nvidia-smi answers);
#   2. the GPU tests (pytest -m gpu: plain student on CUDA agrees with CPU, DiverseDistill on CUDA);
#   3. the plain student and DiverseDistill on CUDA through torchrun with TorchRec's
#      DistributedModelParallel on one rank (nccl), ML-100K;
#   4. bench_student (appdistill's loop against a hand-written TorchRec loop) at batch 8k and 16k.
# Writes OUT/summary.md (and the logs beside it). Exit 2 when no GPU is visible.
# Usage: scripts/gpu_check.sh [OUT_DIR]      (default runs/gpu_check)
set -euo pipefail
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
if ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi fails); nothing to check" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
VENV=${VENV:-.venv-gpu}
[ -f "$VENV/.installed" ] || { bash scripts/install.sh "$VENV" && touch "$VENV/.installed"; }
PY="$VENV/bin/python"
"$PY" -c "import torch, fbgemm_gpu; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('cuda ok:', torch.cuda.get_device_name(0), torch.version.cuda)"

export APPDISTILL_DEVICE=cuda OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
"$PY" -m pytest -q -m gpu tests 2>&1 | tee "$OUT/tests.log"

run() {  # one rank, nccl, DMP-sharded tables
  "$VENV/bin/torchrun" --standalone --nproc_per_node 1 -m appdistill "$@" --no-progress
}
run train configs/ml100k_plain.yaml --run-dir "$OUT/plain" 2>&1 | tee "$OUT/plain.log"
run teachers fit configs/ml100k_committee.yaml --run-dir "$OUT/committee" 2>&1 | tee "$OUT/teachers.log"
run distill configs/ml100k_committee.yaml --run-dir "$OUT/committee" 2>&1 | tee "$OUT/distill.log"

for bs in 8192 16384; do
  "$PY" benchmarks/bench_student.py --out "$OUT/student-bs$bs" --epochs 3 --repeats 3 \
    --set train.batch_size=$bs --set train.embedding_lr=0.1 2>&1 | tee "$OUT/student-bs$bs.log"
done

{
  echo "# gpu_check $(date -u +%FT%TZ)"; echo; cat "$OUT/gpu.txt"; echo
  echo "| run | test AUC | samples/s |"; echo "|---|---:|---:|"
  for r in plain committee; do
    "$PY" -c "import json,sys; m=json.load(open('$OUT/$r/metrics.json')); print(f\"| $r ({m['method']}) | {m['test']['auc']:.4f} | {m['train']['samples_per_s']:,.0f} |\")"
  done
  echo; for bs in 8192 16384; do echo "bench_student batch $bs:"; cat "$OUT/student-bs$bs/results.md"; done
} > "$OUT/summary.md"
cat "$OUT/summary.md"
