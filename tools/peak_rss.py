"""Peak resident memory of `med3d prepare`, `predict` and `evaluate` on the real lung CT, the Colin27
brain and a generated 512x512x400 chest CT (BENCHMARKS.md, "Memory").

    .venv/bin/python tools/peak_rss.py WORK [--cases lung brain big] [--keep NAME]

WORK is a scratch folder (the generated CT, about 25 MB compressed, is written once and reused).
Each command runs as the CLI in a fresh process; see ``med3d.bench_memory``. ``--keep NAME`` copies
each case's predicted label map to WORK/labels-NAME/ so two versions of the code can be compared
(``--compare A B`` prints their voxel agreement).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"

# name: (image, label, modality, classes of the checkpoint's head, plan spacing (z, y, x) mm, window)
CASES = {
    "lung": (REAL / "radiomics" / "lung1_image.nrrd", REAL / "radiomics" / "lung1_label.nrrd", "CT", 2,
             [5.0, 1.0, 1.0], [32, 64, 64]),
    "brain": (REAL / "colin27" / "t1.nii.gz", REAL / "colin27" / "aal.nii.gz", "MR", 117, [2.0, 2.0, 2.0],
              [32, 64, 64]),
    "brain2": (REAL / "colin27" / "t1.nii.gz", REAL / "colin27" / "aal.nii.gz", "MR", 2, [2.0, 2.0, 2.0],
               [32, 64, 64]),  # the same scan with a 2-class head (labels > 1 read as class 1 by evaluate's table)
    "big": (None, None, "CT", 2, [2.0, 1.5, 1.5], [32, 64, 64]),
    # the same commands on a 16x32x32 CT: their fixed cost (imports, model, one window batch)
    "tiny": (None, None, "CT", 2, [2.0, 1.5, 1.5], [32, 64, 64]),
}
GENERATED = {"big": (400, 512, 512), "tiny": (16, 32, 32)}


def link_dataset(root: Path, image: Path, label: Path, modality: str, num_classes: int) -> Path:
    """(With 2 classes and a label file holding more values, every value > 0 maps to class 1.)"""
    """A one-case Decathlon dataset at ``root`` linking to ``image`` and ``label`` (nothing copied)."""
    suffix = "".join(image.suffixes[-2:]) if image.name.endswith(".nii.gz") else image.suffix
    for sub, src in (("imagesTr", image), ("labelsTr", label)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        link = root / sub / f"case{suffix}"
        if not link.exists():
            link.symlink_to(src)
    labels = {"0": "background", **{str(i): f"class{i}" for i in range(1, num_classes)}}
    meta = {"name": root.name, "modality": {"0": modality}, "labels": labels,
            "training": [{"image": f"./imagesTr/case{suffix}", "label": f"./labelsTr/case{suffix}"}], "test": []}
    if num_classes == 2 and "colin27" in str(image):
        meta["label_map"] = {"class1": list(range(1, 117))}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root / "imagesTr" / f"case{suffix}"


def main() -> int:
    from med3d.bench_memory import baseline_mb, measure_case, volume_mb, write_ct_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--no-evaluate", action="store_true", help="measure prepare and predict only")
    ap.add_argument("--keep", help="copy each predicted label map to WORK/labels-KEEP/")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="voxel agreement of WORK/labels-A and labels-B")
    args = ap.parse_args()
    if args.compare:
        return compare(args.work, *args.compare)
    base = baseline_mb()
    print(f"baseline (imports only): {base:.0f} MiB")
    print(f"{'case':<6} {'volume':>16} {'1 copy MiB':>10} {'command':<9} {'peak MiB':>9} {'above base':>10} "
          f"{'copies':>7}")
    results = {"baseline_mb": base, "cases": {}}
    for name in args.cases:
        image, label, modality, k, spacing, patch = CASES[name]
        root = args.work / name
        if image is None:
            image = root / "imagesTr" / "chest.nii.gz"
            if not image.is_file():
                write_ct_dataset(root, GENERATED[name])
        else:
            image = link_dataset(root, image, label, modality, k)
        one = volume_mb(image)
        mapped = "label_map" in json.loads((root / "dataset.json").read_text())
        ref = root if mapped else root / "labelsTr"  # a dataset folder: evaluate applies its label map
        rows = measure_case(args.work / f"{name}-run", root, image, ref, k, patch, spacing,
                            evaluate=not args.no_evaluate)
        for r in rows:
            above = r["peak_mb"] - base
            print(f"{name:<6} {_shape(image):>16} {one:>10.0f} {r['command']:<9} {r['peak_mb']:>9.0f} "
                  f"{above:>10.0f} {above / one:>7.2f}" + (f"  FAILED rc={r['rc']}: {r['stderr'][-300:]}" if r["rc"]
                                                           else ""))
        results["cases"][name] = {"one_copy_mb": one, "rows": rows}
        if args.keep:
            dest = args.work / f"labels-{args.keep}"
            dest.mkdir(exist_ok=True)
            for f in (args.work / f"{name}-run" / "pred").iterdir():
                if f.name.endswith((".nii.gz", ".nrrd")):
                    shutil.copy(f, dest / f"{name}{''.join(f.suffixes)}")
    (args.work / "peak_rss.json").write_text(json.dumps(results, indent=1))
    return 0


def _shape(path: Path) -> str:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return "x".join(str(s) for s in r.GetSize())


def compare(work: Path, a: str, b: str) -> int:
    from med3d.data.image import read_image

    for fa in sorted((work / f"labels-{a}").iterdir()):
        fb = work / f"labels-{b}" / fa.name
        if not fb.is_file():
            print(f"{fa.name}: only in labels-{a}")
            continue
        la, lb = read_image(fa).array, read_image(fb).array
        diff = int((la != lb).sum())
        print(f"{fa.name}: {diff} of {la.size} voxels differ ({diff / la.size:.2e}); labels {np.unique(la).size} / "
              f"{np.unique(lb).size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
