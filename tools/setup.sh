#!/usr/bin/env bash
# Create .venv and install med3d into it (editable, with the test extras).
# torch goes first and pinned: here `pip install torch==2.13.0` takes the CPU build from local
# disk, while an open-ended requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${MED3D_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/med3d --version
