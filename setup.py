"""Build hook: the wheel carries the shipped configs, dataset descriptors and weights index.

setup.cfg holds the metadata. The top-level ``configs/``, ``datasets/`` and ``weights/``
folders stay the source of truth; ``build_py`` copies them into ``med3d/_resources`` inside
the build, where ``med3d.resources`` finds them in an installed wheel.
"""
from pathlib import Path
from typing import List

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGED = Path("med3d") / "_resources"  # keep in step with med3d.resources.PACKAGED
RESOURCES = {  # folder -> glob patterns, relative to the repository root
    "configs": ("**/*.yaml",),
    "datasets": ("**/*.yaml", "README.md"),
    "weights": ("index.yaml", "README.md"),
}


def resource_files() -> List[Path]:
    """The files to ship, relative to the repository root; a missing folder fails the build."""
    files = []
    for folder, patterns in RESOURCES.items():
        if not (ROOT / folder).is_dir():
            raise SystemExit(f"setup.py: {ROOT / folder} is missing; build from a full source tree")
        for pattern in patterns:
            files += sorted(p.relative_to(ROOT) for p in (ROOT / folder).glob(pattern) if p.is_file())
    return files


class BuildWithResources(build_py):
    """build_py that also copies the shipped resources into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the top-level folders in place
            return
        for rel in resource_files():
            target = Path(self.build_lib) / PACKAGED / rel
            self.mkpath(str(target.parent))
            self.copy_file(str(ROOT / rel), str(target))

    def get_outputs(self, include_bytecode: bool = True) -> List[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [str(Path(self.build_lib) / PACKAGED / rel) for rel in resource_files()]


setup(cmdclass={"build_py": BuildWithResources})
