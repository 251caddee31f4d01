#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: a virtual environment in .venv with
# PyTorch, this package (editable) and its training and development extras.
#
# PyTorch is installed first, and only where the environment has none, so that pip never
# resolves the plain `torch` requirement to a multi-GB CUDA build by accident. Override:
#   TORCH_SPEC="torch==2.5.1"                                  which torch to install
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"   extra pip arguments
#   VENV=/path/to/venv                                         where the environment lives
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  pip_install $TORCH_PIP_ARGS "$TORCH_SPEC"
fi
# The editable install is redone only when pyproject.toml changed since the last one.
stamp="$VENV/.settransformer-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing settransformer[all]"
  pip_install -e ".[all]"
  touch "$stamp"
fi
