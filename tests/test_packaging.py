"""The wheel carries the shipped configs, dataset descriptors and weights index (built, not installed).

tools/wheel_check.sh goes further in CI: it installs the wheel into a fresh venv and runs med3d.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what a build reads; copied so that the repository's own build/ (stale files) plays no part
SOURCES = ["med3d", "configs", "datasets", "weights", "setup.py", "setup.cfg", "pyproject.toml", "README.md",
           "MANIFEST.in"]


def shipped_files():
    """The files setup.py must copy, as paths relative to the repository root."""
    files = [*REPO.glob("configs/**/*.yaml"), *REPO.glob("datasets/**/*.yaml"), REPO / "datasets" / "README.md",
             REPO / "weights" / "index.yaml"]
    return sorted(p.relative_to(REPO).as_posix() for p in files)


def build_isolation_flags():
    """Build with this environment's setuptools when it can make wheels (no index needed), else isolated."""
    try:
        import setuptools
    except ImportError:
        return []
    version = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
    # setuptools 70.1 builds wheels itself; older ones need the wheel package
    return ["--no-build-isolation"] if version >= (70, 1) or importlib.util.find_spec("wheel") else []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "_resources", "*.pth",
                                                                            "*.pt", "*.safetensors", "*.onnx"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *build_isolation_flags(),
                        "-w", str(out), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("med3d-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_carries_the_shipped_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = shipped_files()
    assert "configs/demo/pretrain.yaml" in expected and "weights/index.yaml" in expected
    missing = [f for f in expected if f"med3d/_resources/{f}" not in names]
    assert not missing, missing
    assert {"med3d/cli/__init__.py", "med3d/cli/__main__.py", "med3d/resources.py"} <= names
    assert "med3d/cli.py" not in names


@pytest.mark.slow
def test_unpacked_wheel_runs_from_anywhere(wheel, tmp_path):
    """The wheel's files alone (as pip would install them) answer `med3d weights list` and `med3d config`."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    for args, expected in ((["weights", "list"], "resnet_50.pth"),
                           (["config", "configs/demo/pretrain.yaml"], "Task03_LiverDemo")):
        r = subprocess.run([sys.executable, "-m", "med3d.cli", *args], capture_output=True, text=True,
                           cwd=elsewhere, env=env)
        assert r.returncode == 0 and expected in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import med3d.resources as r; print(r.resource_root())"],
                       capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.stdout.strip() == str(site / "med3d" / "_resources"), r.stderr
