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
# On x86-64 Linux the test extras bring onnxruntime's OpenVINO build. It installs the same module as the
# plain onnxruntime, so a plain build left by an earlier setup is removed first, not overwritten.
if [ "$(uname -m)" = x86_64 ] && .venv/bin/python -m pip show -q onnxruntime 2>/dev/null; then
  .venv/bin/python -m pip uninstall -q -y onnxruntime
fi
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/med3d --version
