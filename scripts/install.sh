#!/usr/bin/env bash
# Install the pinned stack into a virtual environment.
# Usage: scripts/install.sh [VENV_DIR] [PYTHON]
# Order matters: torchrec goes in with --no-deps because its own `fbgemm-gpu` requirement would
# pull the CUDA build, which cannot load without a GPU driver.
set -euo pipefail
VENV=${1:-.venv}
PY=${2:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip wheel setuptools
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  "${PIP[@]}" fbgemm-gpu==1.9.0
else
  "${PIP[@]}" fbgemm-gpu-cpu==1.9.0
fi
"${PIP[@]}" --no-deps torchrec==1.9.2
"${PIP[@]}" --no-deps recbole==1.2.1   # only for its dataset_example/ml-100k files
# the rest (and the package itself, editable, with MLflow tracking); pyproject pins what must match
"${PIP[@]}" -e ".[dev,tracking]"
"$VENV/bin/python" -c "import torchrec, fbgemm_gpu, lightgbm, sentence_transformers, open_clip, mlflow; print('appdistill install ok: torch', __import__('torch').__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '?')"
