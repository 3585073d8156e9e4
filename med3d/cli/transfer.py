"""Transfer subcommands: export, inflate, weights list / verify, encoders."""
from __future__ import annotations

import argparse

from ..errors import Med3DError
from ._common import Subparsers


def _exported_kind(path: str) -> str:
    """The task kind an ONNX export records in its metadata (``export.onnx_metadata`` writes it)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return props.get("kind", "")


def _export(args: argparse.Namespace) -> int:
    from ..convert import model_from_file
    from ..export import ENCODER_FORMATS, export_encoder, export_onnx, export_torchscript
    from ..model_card import run_metrics
    from ..paths import check_output_file

    check_output_file(args.out, [args.checkpoint])  # before the model is read: never over its own source
    model, meta = model_from_file(args.checkpoint, arch=args.arch, in_channels=args.in_channels,
                                  layout=args.layout, conv=args.conv, shortcut=args.shortcut)
    metrics = run_metrics(args.checkpoint)  # for the model card: the run's validation scores, where known
    if args.format in ENCODER_FORMATS:
        export_encoder(model, args.format, args.out, meta=meta, overwrite=args.overwrite, licence=args.licence,
                       metrics=metrics)
    elif args.format == "onnx":
        diff = export_onnx(model, args.out, args.input_size, task=args.task, overwrite=args.overwrite, meta=meta,
                           licence=args.licence, metrics=metrics)
        print(f"onnxruntime vs PyTorch on random inputs at two sizes: max abs difference {diff:.2e}")
        if _exported_kind(args.out) == "classification":
            print("note: med3d predict runs ONNX exports of segmentation heads; this classification network is "
                  "for other runtimes (predict with the checkpoint)")
    else:
        export_torchscript(model, args.out, args.input_size, task=args.task, overwrite=args.overwrite)
    print(f"wrote {args.out} ({args.format})")
    return 0


def _inflate(args: argparse.Namespace) -> int:
    from ..convert import inflate_file
    from ..paths import check_output_file

    check_output_file(args.out, [args.src])
    inflate_file(args.src, args.arch, args.out, mode=args.mode, layout=args.layout, in_channels=args.in_channels,
                 overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from ..weights_index import index_lines, read_index, verify_weights

    index = read_index()
    if args.action == "list":
        for line in index_lines(index):
            print(line)
        return 0
    if not args.file:
        raise Med3DError("weights verify: give the FILE to verify")
    result = verify_weights(args.file, index)
    for line in result.lines:
        print(line)
    if result.error:
        raise Med3DError(result.error)
    return 0


def _encoders(args: argparse.Namespace) -> int:
    from ..api import create_encoder, list_encoders

    print(f"{'arch':<10} {'shortcut':>8} {'params (M)':>11}")
    for name in list_encoders():
        enc = create_encoder(name)
        n = sum(p.numel() for p in enc.parameters()) / 1e6
        print(f"{name:<10} {enc.config['shortcut']:>8} {n:>11.2f}")
    return 0


def add_export(sub: Subparsers) -> None:
    """Add ``med3d export``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    from ..choices import CONVS, FORMATS, LAYOUTS

    p = sub.add_parser("export", help="export encoder weights or a whole model in another format",
                       description="Export from a med3d checkpoint, a med3d export, or other encoder weights "
                                   "(with --arch). Encoder formats: safetensors (default, with metadata), pt, "
                                   "medicalnet, monai. Whole-model formats (need a head): onnx (with the plan "
                                   "`med3d predict model.onnx` needs), torchscript (legacy).")
    p.add_argument("checkpoint", help="med3d checkpoint or weights file")
    p.add_argument("--format", choices=FORMATS, default="safetensors")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--task", help="which head to export (onnx, torchscript)")
    p.add_argument("--input-size", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"),
                   help="example input for tracing (ONNX: rounded up to the head's size divisibility; the graph "
                   "takes any multiple of it)")
    p.add_argument("--licence", "--license", dest="licence",
                   help="licence of the exported weights, stated in the model card (default: unspecified)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--arch", help="encoder for plain weights, e.g. resnet50")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--layout", choices=LAYOUTS, default="dilated")
    p.add_argument("--conv", choices=CONVS, default="3d", help="3d, or slicewise (1x3x3 kernels, no striding along depth)")
    p.add_argument("--shortcut", choices=["A", "B"])
    p.set_defaults(handler=_export)


def add_inflate(sub: Subparsers) -> None:
    """Add ``med3d inflate``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    from ..choices import INFLATE_MODES as MODES, LAYOUTS

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
    q.set_defaults(handler=_inflate)


def add_weights(sub: Subparsers) -> None:
    """Add ``med3d weights``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    w = sub.add_parser("weights", help="known public encoders: list, or verify a file")
    w.add_argument("action", choices=["list", "verify"])
    w.add_argument("file", nargs="?", help="weights file to verify")
    w.set_defaults(handler=_weights)


def add_encoders(sub: Subparsers) -> None:
    """Add ``med3d encoders``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("encoders", help="list the encoders and their parameter counts")
    p.set_defaults(handler=_encoders)
