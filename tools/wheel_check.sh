#!/usr/bin/env bash
# Check that a wheel install works on its own: build the sdist and the wheel from it, install
# the wheel (not editable) into a fresh venv outside the repo, and run med3d from a folder
# where configs/, datasets/ and weights/ do not exist, so every shipped file must come from
# the wheel. torch goes first and pinned, as in tools/setup.sh (the CPU build from local disk);
# the other dependencies come from the pip cache or the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/med3d-wheel-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

say() { echo "wheel_check: $*"; }
fail() { echo "wheel_check: FAILED: $*" >&2; exit 1; }

# run NAME EXPECTED CMD...: run CMD from $WORK/elsewhere; fail on a non-zero exit or when
# EXPECTED (a fixed string) is missing from its output.
run() {
    local name=$1 expected=$2 status=0
    shift 2
    say "$name"
    (cd "$WORK/elsewhere" && "$@") >"$WORK/out.txt" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$WORK/out.txt" >&2
        fail "$name exited with status $status"
    fi
    grep -qF -- "$expected" "$WORK/out.txt" || { tail -n 40 "$WORK/out.txt" >&2; fail "$name: no '$expected' in its output"; }
}

say "fresh venv in $WORK/venv"
"$PY" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q build "torch==${MED3D_TORCH_VERSION:-2.13.0}"

say "building the sdist and, from it, the wheel"
"$VPY" -m build -q --outdir "$WORK/dist" "$REPO" >"$WORK/build.txt" 2>&1 || { tail -n 40 "$WORK/build.txt" >&2; fail "build"; }
WHEEL=$(ls "$WORK"/dist/med3d-*.whl)

say "installing $(basename "$WHEEL")"
"$VPY" -m pip install -q "$WHEEL" || fail "pip install $WHEEL"

mkdir "$WORK/elsewhere"
run "med3d is the installed copy" "$WORK/venv/" "$VPY" -c "import med3d; print(med3d.__file__)"
run "med3d weights list" "resnet_50.pth" "$WORK/venv/bin/med3d" weights list
run "med3d config configs/demo/pretrain.yaml" "Task03_LiverDemo" "$WORK/venv/bin/med3d" config configs/demo/pretrain.yaml
run "med3d demo --quick" "pretrained encoder" "$WORK/venv/bin/med3d" demo --quick --quiet --out "$WORK/demo"
say "ok: the wheel installs and runs without the source tree"
