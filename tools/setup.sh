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
# Where the test extras bring onnxruntime's OpenVINO build (setup.cfg's markers), a plain onnxruntime left by
# an earlier setup goes first: both install the module onnxruntime, and removing one of two installed builds
# deletes files the other needs, so both go and the OpenVINO build is installed afresh below.
if .venv/bin/python -c 'import platform, sys; sys.exit(not (sys.platform == "linux" and platform.machine() == "x86_64"
    and (3, 10) <= sys.version_info[:2] < (3, 14)))' && .venv/bin/python -m pip show -q onnxruntime 2>/dev/null; then
  .venv/bin/python -m pip uninstall -q -y onnxruntime onnxruntime-openvino
fi
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/med3d --version
