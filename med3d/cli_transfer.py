"""Transfer subcommands: export, inflate, weights list / verify."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Callable, Dict

import yaml

from .errors import Med3DError

Handler = Callable[[argparse.Namespace], int]
WEIGHTS_INDEX = Path(__file__).resolve().parent.parent / "weights" / "index.yaml"


def _model_from_file(args: argparse.Namespace):
    """A med3d checkpoint rebuilds its model; other weights need --arch (and friends) to build an encoder."""
    from .api import create_encoder
    from .checkpoint import model_from_weights
    from .transfer.formats import read_weights
    from .transfer.load import load_pretrained

    weights = read_weights(args.checkpoint)
    if weights.config is not None:
        model, _, meta = model_from_weights(weights, args.checkpoint)
        return model, meta
    if weights.source == "med3d" and isinstance(weights.metadata.get("encoder"), dict):
        enc_cfg = dict(weights.metadata["encoder"])
        enc = create_encoder(enc_cfg.pop("arch"), **enc_cfg)
    elif args.arch:
        enc = create_encoder(args.arch, in_channels=args.in_channels, layout=args.layout, kernel=args.kernel,
                             shortcut=args.shortcut)
    else:
        raise Med3DError(f"{args.checkpoint}: plain {weights.source} weights carry no architecture; "
                         "give --arch (and --layout/--kernel/--shortcut if not the defaults)")
    print(load_pretrained(enc, weights))
    return enc, {k: v for k, v in weights.metadata.items() if k not in ("format", "sha256", "encoder")}


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ENCODER_FORMATS, export_encoder, export_onnx, export_torchscript

    model, meta = _model_from_file(args)
    if args.format in ENCODER_FORMATS:
        export_encoder(model, args.format, args.out, meta=meta, overwrite=args.overwrite)
    elif args.format == "onnx":
        diff = export_onnx(model, args.out, args.input_size, task=args.task, overwrite=args.overwrite)
        print(f"onnxruntime vs PyTorch on a random input: max abs difference {diff:.2e}")
    else:
        export_torchscript(model, args.out, args.input_size, task=args.task, overwrite=args.overwrite)
    print(f"wrote {args.out} ({args.format})")
    return 0


def cmd_inflate(args: argparse.Namespace) -> int:
    from .api import create_encoder
    from .export import export_encoder
    from .transfer.formats import Weights, read_weights
    from .transfer.inflate import inflate_state_dict
    from .transfer.load import load_pretrained

    src = read_weights(args.src)
    if src.source != "torchvision":
        raise Med3DError(f"{args.src}: holds {src.source} 3D weights, not a 2D ResNet; nothing to inflate")
    kernel = "1x3x3" if args.mode == "1x3x3" else "3x3x3"
    in_channels = args.in_channels or src.state_dict["conv1.weight"].shape[1]
    enc = create_encoder(args.arch, in_channels=in_channels, layout=args.layout, kernel=kernel, shortcut="B")
    sd3d = inflate_state_dict(src.state_dict, args.mode)
    print(load_pretrained(enc, Weights(sd3d, "plain")))
    meta = {"inflated_from": Path(args.src).name, "inflation": args.mode,
            "normalisation": "ImageNet RGB mean/std (torchvision)"}
    export_encoder(enc, "safetensors", args.out, meta=meta, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def _index() -> Dict:
    return yaml.safe_load(WEIGHTS_INDEX.read_text())


def cmd_weights(args: argparse.Namespace) -> int:
    index = _index()
    if args.action == "list":
        for family, spec in index.items():
            print(f"{family}: {spec['published']}")
            for e in spec["entries"]:
                print(f"  {e['file']:<26} {e['arch']:<10} shortcut {e['shortcut']}  {e['layout']:<8} "
                      f"{e['in_channels']} ch  sha256 {e['sha256'] or 'not recorded'}")
        return 0
    if not args.file:
        raise Med3DError("weights verify: give the FILE to verify")
    return _verify(Path(args.file), index)


def _verify(path: Path, index: Dict) -> int:
    from .export import tensors_sha256
    from .transfer.formats import describe_state_dict, read_weights, summarize

    if not path.is_file():
        raise Med3DError(f"{path}: weights file not found")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    weights = read_weights(path)
    info = describe_state_dict(weights.state_dict)
    print(f"{path}: {weights.source} weights, {summarize(info)}; file sha256 {digest}")
    entries = [e for spec in index.values() for e in spec["entries"]]
    known = [e for e in entries if e["sha256"] == digest] or [e for e in entries if e["file"] == path.name]
    if weights.metadata.get("sha256"):
        ok = tensors_sha256(weights.state_dict) == weights.metadata["sha256"]
        print(f"tensor hash in metadata: {'matches' if ok else 'DOES NOT MATCH'}")
        if not ok:
            raise Med3DError(f"{path}: tensors differ from the hash recorded at export; the file is altered")
    if not known:
        print("not in weights/index.yaml")
        return 0
    entry = known[0]
    if entry["sha256"] and entry["sha256"] != digest:
        raise Med3DError(f"{path}: sha256 {digest} differs from the index's {entry['sha256']} for {entry['file']}")
    prefix = entry.get("sha256_prefix")
    if prefix and not digest.startswith(prefix):
        raise Med3DError(f"{path}: sha256 {digest[:8]}... does not start with {prefix} as {entry['file']} must")
    if info.get("arch") != entry["arch"] or info.get("shortcut") != entry["shortcut"]:
        raise Med3DError(f"{path}: holds {summarize(info)} but the index lists {entry['file']} as "
                         f"{entry['arch']} shortcut {entry['shortcut']}")
    print(f"matches index entry {entry['file']} ({entry['arch']}, shortcut {entry['shortcut']}, "
          f"{'sha256 verified' if entry['sha256'] or prefix else 'structure verified; sha256 not recorded'})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> Dict[str, Handler]:
    from .export import FORMATS
    from .models.resnet3d import KERNELS, LAYOUTS
    from .transfer.inflate import MODES

    p = sub.add_parser("export", help="export encoder weights or a whole model in another format",
                       description="Export from a med3d checkpoint, a med3d export, or other encoder weights "
                                   "(with --arch). Encoder formats: safetensors (default, with metadata), pt, "
                                   "medicalnet, monai. Whole-model formats (need a head): onnx, torchscript.")
    p.add_argument("checkpoint", help="med3d checkpoint or weights file")
    p.add_argument("--format", choices=FORMATS, default="safetensors")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--task", help="which head to export (onnx, torchscript)")
    p.add_argument("--input-size", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"),
                   help="example input for tracing (spatial axes stay dynamic in ONNX)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--arch", help="encoder for plain weights, e.g. resnet50")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--layout", choices=LAYOUTS, default="dilated")
    p.add_argument("--kernel", choices=KERNELS, default="3x3x3")
    p.add_argument("--shortcut", choices=["A", "B"])

    q = sub.add_parser("inflate", help="inflate a 2D ImageNet ResNet (torchvision keys) to a 3D encoder",
                       description="1x3x3: slice-wise, the 2D kernels unchanged; i3d: kernels repeated over "
                                   "depth and divided; center: 2D kernel in the centre slice.")
    q.add_argument("src", help="2D ResNet state dict (.pth / .safetensors)")
    q.add_argument("--arch", required=True, help="resnet18, resnet34, resnet50, ...")
    q.add_argument("--mode", choices=MODES, default="1x3x3")
    q.add_argument("--layout", choices=LAYOUTS, default="strided",
                   help="strided keeps the 2D network's strides (default)")
    q.add_argument("--in-channels", type=int, help="adapt the first conv to this many channels")
    q.add_argument("--out", required=True, help="output .safetensors")
    q.add_argument("--overwrite", action="store_true")

    w = sub.add_parser("weights", help="known public encoders: list, or verify a file")
    w.add_argument("action", choices=["list", "verify"])
    w.add_argument("file", nargs="?", help="weights file to verify")
    return {"export": cmd_export, "inflate": cmd_inflate, "weights": cmd_weights}
