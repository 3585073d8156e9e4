"""Peak resident memory of `med3d prepare`, `predict` and `evaluate` on real and generated volumes.

The real lung CT (NRRD) and Colin27 brain, a generated 512x512x400 chest CT, and 16x32x32 CTs for
the fixed cost (BENCHMARKS.md, "Memory").

    .venv/bin/python tools/peak_rss.py WORK [--cases lung brain big tiny tinynrrd] [--repeats N] [--keep NAME]

WORK is a scratch folder (the generated CT, about 25 MB compressed, is written once and reused).
Each command runs as the CLI in a fresh process; see ``med3d.bench_memory``. ``--keep NAME`` copies
each case's predicted label map to WORK/labels-NAME/ so two versions of the code can be compared
(``--compare A B`` prints their voxel agreement).

"copies" is (peak - fixed cost) / one float32 copy of the input volume, the fixed cost being the
same command on a 16x32x32 CT stored in the same format: ``tiny`` (NIfTI, read by nibabel) for the
NIfTI cases, ``tinynrrd`` (NRRD, read by SimpleITK, whose library alone adds about 94 MiB to the
resident set) for the NRRD ones. ``lungnii`` is the lung CT's voxels and geometry written as NIfTI,
the same volume without SimpleITK.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

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
    # ... stored as NRRD: the fixed cost with SimpleITK loaded, as for the NRRD cases
    "tinynrrd": (None, None, "CT", 2, [2.0, 1.5, 1.5], [32, 64, 64]),
    # the lung CT written as NIfTI (int16, same geometry): the same volume read by nibabel
    "lungnii": (None, None, "CT", 2, [5.0, 1.0, 1.0], [32, 64, 64]),
}
GENERATED = {"big": (400, 512, 512), "tiny": (16, 32, 32)}
# case: (the case it is converted from, the suffix it is written with)
CONVERTED = {"tinynrrd": ("tiny", ".nrrd"), "lungnii": ("lung", ".nii.gz")}


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


def converted_dataset(work: Path, name: str) -> Path:
    """WORK/NAME: a one-case dataset holding case ``CONVERTED[name][0]``'s image and label in another format.

    Voxels (dtype included) and geometry are read and written by med3d's own reader and writer.
    """
    from med3d.data.image import read_image, write_image

    source, suffix = CONVERTED[name]
    image, label = dataset_files(work, source)
    root = work / name
    out = [root / "imagesTr" / f"case{suffix}", root / "labelsTr" / f"case{suffix}"]
    if not out[0].is_file():
        for src, dst in zip((image, label), out):
            dst.parent.mkdir(parents=True, exist_ok=True)
            img = read_image(src)
            write_image(dst, img.array, img.geometry)
        meta = json.loads((work / source / "dataset.json").read_text())
        meta["training"] = [{"image": f"./imagesTr/{out[0].name}", "label": f"./labelsTr/{out[1].name}"}]
        (root / "dataset.json").write_text(json.dumps(meta))
    return out[0]


def dataset_files(work: Path, name: str) -> Tuple[Path, Path]:
    """The image and label of case ``name``'s dataset in WORK, written (generated, linked, converted) if missing."""
    from med3d.bench_memory import write_ct_dataset

    if name in CONVERTED:
        image = converted_dataset(work, name)
        return image, Path(str(image).replace("imagesTr", "labelsTr"))
    image, label, modality, k = CASES[name][:4]
    root = work / name
    if image is None:
        image = root / "imagesTr" / "chest.nii.gz"
        if not image.is_file():
            write_ct_dataset(root, GENERATED[name])
        return image, root / "labelsTr" / "chest.nii.gz"
    return link_dataset(root, image, label, modality, k), label


def main() -> int:
    from med3d.bench_memory import baseline_mb, measure_case, volume_mb

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--no-evaluate", action="store_true", help="measure prepare and predict only")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each command N times and keep the median peak (predict varies by ~15 MiB with "
                         "thread scheduling)")
    ap.add_argument("--keep", help="copy each predicted label map to WORK/labels-KEEP/")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="voxel agreement of WORK/labels-A and labels-B")
    args = ap.parse_args()
    if args.compare:
        return compare(args.work, *args.compare)
    args.work.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {"baseline_mb": baseline_mb(), "cases": {}}
    print(f"baseline (imports only): {results['baseline_mb']:.0f} MiB")
    for name in args.cases:
        _, _, _, k, spacing, patch = CASES[name]
        image, label = dataset_files(args.work, name)
        root = args.work / name
        mapped = "label_map" in json.loads((root / "dataset.json").read_text())
        ref = root if mapped else root / "labelsTr"  # a dataset folder: evaluate applies its label map
        runs = [measure_case(args.work / f"{name}-run", root, image, ref, k, patch, spacing,
                             evaluate=not args.no_evaluate) for _ in range(max(1, args.repeats))]
        rows = [dict(r, peak_mb=float(np.median([run[i]["peak_mb"] for run in runs if len(run) > i])),
                     peaks_mb=[run[i]["peak_mb"] for run in runs if len(run) > i]) for i, r in enumerate(runs[0])]
        results["cases"][name] = {"one_copy_mb": volume_mb(image), "format": _format(image), "shape": _shape(image),
                                  "rows": rows}
        if args.keep and (args.work / f"{name}-run" / "pred").is_dir():
            dest = args.work / f"labels-{args.keep}"
            dest.mkdir(exist_ok=True)
            for f in (args.work / f"{name}-run" / "pred").iterdir():
                if f.name.endswith((".nii.gz", ".nrrd")):
                    shutil.copy(f, dest / f"{name}{''.join(f.suffixes)}")
    _print_table(results["cases"])
    (args.work / "peak_rss.json").write_text(json.dumps(results, indent=1))
    return 0


def _format(path: Path) -> str:
    return "nifti" if str(path).endswith((".nii", ".nii.gz")) else "sitk"


def _print_table(cases: Dict[str, Any]) -> None:
    """One row per case and command: peak, the fixed cost of its format (when measured) and the copies."""
    fixed = {("nifti" if name == "tiny" else "sitk", r["command"]): r["peak_mb"]
             for name in ("tiny", "tinynrrd") if name in cases for r in cases[name]["rows"]}
    print(f"{'case':<9} {'volume':>12} {'1 copy MiB':>10} {'command':<9} {'peak MiB':>9} {'runs':>15} "
          f"{'fixed MiB':>9} {'copies':>7}")
    for name, case in cases.items():
        one = case["one_copy_mb"]
        for r in case["rows"]:
            base = fixed.get((case["format"], r["command"]))
            copies = f"{(r['peak_mb'] - base) / one:7.2f}" if base is not None and name not in ("tiny", "tinynrrd") \
                else f"{'-':>7}"
            runs = "/".join(f"{v:.0f}" for v in r["peaks_mb"])
            print(f"{name:<9} {case['shape']:>12} {one:>10.0f} {r['command']:<9} {r['peak_mb']:>9.0f} {runs:>15} "
                  f"{base if base is not None else float('nan'):>9.0f} {copies}"
                  + (f"  FAILED rc={r['rc']}: {r['stderr'][-300:]}" if r["rc"] else ""))


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
