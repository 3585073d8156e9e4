#!/usr/bin/env bash
# Run every GPU path of med3d once on one GPU (under 5 minutes) and print one table.
#
#   bash tools/gpu_check.sh [WHEEL_DIR]
#
# Needs a CUDA build of torch. med3d's other dependencies (monai, nibabel, SimpleITK, ...) are
# taken from the environment; on a machine without a package index, give a folder of their
# wheels (pip download them elsewhere) and they are installed into a temporary target first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ $# -ge 1 ]; then
  target=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --target "$target" "$1"/*.whl
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import monai, nibabel, SimpleITK, safetensors" \
  || { echo "gpu_check: med3d's dependencies are missing; pip install -e . or pass a wheel folder" >&2; exit 2; }
exec "$PY" tools/gpu_check.py
