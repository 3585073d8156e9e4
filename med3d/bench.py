"""``med3d bench``: throughput figures printed side by side with a named baseline run in the same process.

- ``loader``: patches/s from med3d's prepared cache (memory-mapped, keyed sampling) against the
  usual MONAI pipeline that decodes the NIfTI for every patch (LoadImaged, EnsureChannelFirstd,
  Spacingd, intensity scaling, RandCropByPosNegLabeld), same workers, same patch size, no augmentation.
- ``train``: training iterations/s of the demo encoder in float32 against bf16 autocast.
- ``infer``: seconds per case of ``med3d predict`` against a plain MONAI sliding window.
- ``onnx``: seconds per case of ``med3d predict`` with onnxruntime running the network against PyTorch eager.
- ``memory``: peak RSS of ``prepare``, ``predict`` and ``evaluate`` on a generated CT (``bench_memory``).
- ``scaling``: seconds per case of ``med3d predict`` against volume size (per voxel, per window).
- ``loop``: the training loop's samples/s against the model-only step on in-memory tensors.

``--cpu-time`` (infer, scaling) times CPU seconds on one thread: steady where other jobs share the CPU.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .device import resolve_device, torch_threads


def _seconds_per_call(fn, repeats: int, dev: torch.device) -> float:
    """Mean wall time of ``fn()`` after one warm-up call (CUDA synchronised around the timed calls)."""
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _rate(loader, n: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up and first decode are not throughput
    t0 = time.perf_counter()
    got = 0
    for batch in it:
        got += 1
        if got >= n:
            break
    return got / (time.perf_counter() - t0)


def monai_baseline_loader(dataset_root: Path, plan: Dict[str, Any], patch_zyx: Sequence[int], workers: int,
                          n: int):
    """The decode-every-time MONAI pipeline (arrays in MONAI's (C, X, Y, Z) order, so the patch is reversed)."""
    from monai import transforms as T
    from monai.data import DataLoader, Dataset

    from .data.datalist import read_dataset

    info = read_dataset(dataset_root)
    files = [{"image": str(c.images[0]), "label": str(c.label)} for c in info.cases]
    files = (files * (n // len(files) + 2))[: n + 1]
    norm = plan["normalization"][0]
    if norm["scheme"] == "ct":
        lo, hi = norm["clip"]
        scale = T.ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    else:
        scale = T.NormalizeIntensityd("image", nonzero=True)
    pipeline = T.Compose([
        T.LoadImaged(["image", "label"]), T.EnsureChannelFirstd(["image", "label"]),
        T.Spacingd(["image", "label"], pixdim=tuple(reversed(plan["target_spacing"])), mode=("bilinear", "nearest")),
        scale,
        T.SpatialPadd(["image", "label"], spatial_size=tuple(reversed(patch_zyx))),  # as med3d pads small volumes
        T.RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=tuple(reversed(patch_zyx)), pos=1, neg=2,
                                 num_samples=1),
    ])
    return DataLoader(Dataset(files, pipeline), batch_size=1, num_workers=workers, shuffle=False)


def loader_bench(dataset_root: Optional[Path] = None, workers: Sequence[int] = (0, 2), n: int = 40,
                 patch: Sequence[int] = (32, 64, 64)) -> List[Dict[str, Any]]:
    """Print and return patches/s of med3d's cache loader and the MONAI baseline for each worker count."""
    from monai.utils import set_determinism

    set_determinism(0)
    tmp = Path(tempfile.mkdtemp(prefix="med3d-bench-"))
    try:
        return _loader_bench(tmp, dataset_root, workers, n, patch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _loader_bench(tmp: Path, dataset_root: Optional[Path], workers: Sequence[int], n: int,
                  patch: Sequence[int]) -> List[Dict[str, Any]]:
    from .data.cache import load_cache, prepare_dataset
    from .data.demo import write_demo_data
    from .data.sampler import MixSchedule, PatchBatches, TaskData, make_loader

    if dataset_root is None:
        write_demo_data(tmp / "raw", n_train=8, n_test=0, tasks=["Task09_SpleenDemo"], show_progress=False)
        dataset_root = tmp / "raw" / "Task09_SpleenDemo"
    prepared = prepare_dataset(dataset_root, tmp / "cache", workers=2, progress=False)
    plan, cases = load_cache(prepared.folder)
    shape = np.median([c.props["shape"] for c in cases], axis=0).astype(int).tolist()
    print(f"dataset {dataset_root} ({len(cases)} cases, median shape {shape} at {plan['target_spacing']} mm), "
          f"patch {list(patch)}, one patch per item, no augmentation")
    print(f"{'workers':>7} {'med3d cache (patches/s)':>24} {'MONAI decode (patches/s)':>25} {'ratio':>7}")
    rows = []
    for w in workers:
        ds = PatchBatches([TaskData("t", cases, plan)], MixSchedule(["t"], [len(cases)]), patch, 1, 0.33, None)
        ours = _rate(make_loader(ds, 0, n * 50, workers=w, persistent_workers=False), n * 10)
        base = _rate(monai_baseline_loader(dataset_root, plan, patch, w, n), n)
        rows.append({"workers": w, "med3d": ours, "monai": base, "ratio": ours / base})
        print(f"{w:>7} {ours:>24.1f} {base:>25.2f} {ours / base:>6.1f}x")
    return rows


def train_bench(iterations: int = 10, batch: int = 2, patch: Sequence[int] = (32, 64, 64),
                device: Optional[str] = None) -> List[Dict[str, Any]]:
    """Training iterations/s of the demo encoder + one Med3D head: float32 against bf16 autocast."""
    from .api import create_model
    from .config import load_config
    from .engine.trainer import training_kernels
    from .resources import resource_path
    from .tasks.segmentation import SegLoss

    dev = resolve_device(device)
    cfg = load_config(resource_path("configs/demo/pretrain.yaml"))
    rows = []
    print(f"{'precision':>9} {'it/s':>8} {'samples/s':>10}   ({cfg.model.encoder.arch} widths "
          f"{cfg.model.encoder.widths}, batch {batch}, patch {list(patch)}, {dev})")
    for name, dtype in (("float32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = create_model(cfg).to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = SegLoss()
        task = model.tasks[0]
        x = torch.randn(batch, 1, *patch, device=dev)
        y = torch.randint(0, cfg.model.heads[task].num_classes, (batch, 1, *patch), device=dev)

        def step() -> None:
            opt.zero_grad()
            with training_kernels(dtype, dev):  # the kernels the trainer uses
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                    out = model(x, task)
                loss_fn(out, y).backward()
            opt.step()

        rate = 1.0 / _seconds_per_call(step, iterations, dev)
        rows.append({"precision": name, "it_per_s": rate, "samples_per_s": rate * batch})
        print(f"{name:>9} {rate:>8.2f} {rate * batch:>10.1f}")
    print(f"bf16 / float32: {rows[1]['it_per_s'] / rows[0]['it_per_s']:.2f}x")
    return rows


def _demo_segmenter(dev: torch.device, patch: Sequence[int]) -> Tuple[Any, torch.nn.Module, str, Dict[str, Any]]:
    """The demo encoder with one Med3D head (seeded), in eval mode on ``dev``, and a CT plan for it.

    Returns:
        The config, the model, its task and the predictor metadata (plan, window).
    """
    from .api import create_model
    from .config import load_config
    from .resources import resource_path

    cfg = load_config(resource_path("configs/demo/finetune.yaml"))
    torch.manual_seed(0)
    model = create_model(cfg).to(dev).eval()
    task = model.tasks[0]
    plan = {"channel_names": ["CT"], "labels": {"0": "background", "1": "spleen"}, "channels": None,
            "target_spacing": [3.0, 1.5, 1.5], "crop_nonzero": True,
            "normalization": [{"scheme": "ct", "clip": [-100.0, 200.0], "mean": 40.0, "std": 30.0}]}
    return cfg, model, task, {"plans": {task: plan}, "patch_size": list(patch)}


def _random_ct(shape_zyx: Sequence[int]) -> Any:
    """A seeded random CT ``Image`` already on the demo plan's grid (nothing to crop or resample)."""
    from .data.image import Geometry, Image

    vol = np.random.default_rng(0).normal(40, 30, (1, *shape_zyx)).astype(np.float32)
    return Image(vol, Geometry(tuple(shape_zyx), (1.5, 1.5, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))


def infer_bench(shape_zyx: Sequence[int] = (128, 256, 256), patch: Sequence[int] = (32, 64, 64),
                overlap: float = 0.5, sw_batch_size: int = 2, repeats: int = 3,
                device: Optional[str] = None, cpu_time: bool = False) -> Dict[str, Any]:
    """Seconds per case of med3d's predict path against a plain MONAI sliding_window_inference call.

    Same model (the demo encoder with one Med3D head), same window, overlap, batch of windows and
    Gaussian blending. med3d's figure includes its pre- and post-processing (crop, normalise,
    restore to the input grid); the baseline is the bare network pass over the volume normalised
    beforehand. Both are timed twice: with the network, and with a stand-in that only allocates the
    network's output (``ZeroNetwork``), which leaves what each costs beside the network: that part is
    steady, where the whole is dominated by the shared network time and its run-to-run spread. On the CPU each figure is the
    fastest of ``repeats`` calls, all taking turns; ``cpu_time``: CPU seconds on one thread.

    Returns:
        Seconds per case: ``monai``, ``med3d`` (with the network), ``monai_beside``, ``med3d_beside``.
    """
    from monai.inferers import sliding_window_inference

    from .inference import Predictor

    dev = resolve_device(device)
    cfg, model, task, meta = _demo_segmenter(dev, patch)
    image = _random_ct(shape_zyx)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    # The baseline gets the volume as the network sees it (normalised once, untimed): the network's speed
    # depends on its input's values, a few percent between raw and normalised CT here.
    x = Predictor(model, meta, dev).prepare(image, task)[0]
    fns = {}
    for suffix, net in (("", model), ("_beside", ZeroNetwork(2))):
        predictor = Predictor(net, meta, dev)

        def plain(net=net) -> None:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                sliding_window_inference(x, tuple(patch), sw_batch_size, lambda t: net(t, task), overlap=overlap,
                                         mode="gaussian")

        fns["monai" + suffix] = plain
        fns["med3d" + suffix] = lambda predictor=predictor: predictor(image, task, overlap=overlap,
                                                                      sw_batch_size=sw_batch_size)
    if dev.type == "cuda":
        times = {name: _seconds_per_call(fn, repeats, dev) for name, fn in fns.items()}
    else:  # taking turns, fastest call: background load on a shared CPU hits both alike
        with one_thread_cpu(cpu_time) as clock:
            times = _fastest_interleaved(fns, repeats, clock)
    print(f"volume {list(shape_zyx)} (z, y, x), window {list(patch)}, overlap {overlap}, sw batch {sw_batch_size}, "
          f"{cfg.model.encoder.arch} widths {cfg.model.encoder.widths}, {dev}, "
          + ("CPU time on 1 thread" if cpu_time else f"torch threads {torch.get_num_threads()}"))
    print(f"{'':>34} {'plain MONAI':>12} {'med3d predict':>14} {'med3d / MONAI':>14}")
    for label, suffix in (("with the network, s/case", ""), ("beside the network, s/case", "_beside")):
        mine, theirs = times["med3d" + suffix], times["monai" + suffix]
        print(f"{label:>34} {theirs:>12.3f} {mine:>14.3f} {mine / theirs:>13.2f}x")
    return times


class ZeroNetwork(torch.nn.Module):
    """A stand-in network for timing what surrounds it: zeros of the right shape, at the cost of allocating them."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor, task: Optional[str] = None) -> torch.Tensor:
        return torch.zeros((x.shape[0], self.classes, *x.shape[2:]), device=x.device)


def _fastest_interleaved(fns: Dict[str, Any], repeats: int, clock=time.perf_counter, block: int = 1
                         ) -> Dict[str, float]:
    """Fastest of ``repeats`` x ``block`` timed calls per function after a warm-up, the functions taking turns.

    Taking turns exposes both to the same background load; the fastest call is the one least
    disturbed by it (a shared CPU's load only ever adds time). ``clock``: ``time.process_time``
    times CPU instead of wall time (see ``one_thread_cpu``). ``block``: calls per turn, for short
    calls where the previous function's idle worker threads, still spinning, would slow the next.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(block):
                t0 = clock()
                fn()
                best[name] = min(best[name], clock() - t0)
    return best


@contextlib.contextmanager
def one_thread_cpu(enabled: bool):
    """With ``enabled``: torch on one thread, timed by process CPU time (yields the clock).

    On a CPU shared with other jobs wall times vary several-fold; the CPU time of a single-threaded
    run barely moves, so ratios taken this way compare code, not load. Without: wall time, as set.
    """
    if not enabled:
        yield time.perf_counter
        return
    with torch_threads(1):
        yield time.process_time


def onnx_bench(shape_zyx: Sequence[int] = (96, 192, 192), patch: Sequence[int] = (32, 64, 64), overlap: float = 0.5,
               sw_batch_size: int = 2, repeats: int = 3) -> Dict[str, Any]:
    """Seconds per case of ``med3d predict`` with the network run by onnxruntime against PyTorch eager, on the CPU.

    One process, one model (the demo encoder with one Med3D head, exported with ``export_onnx``),
    one volume and the same ``Predictor`` code around the network call, so the ratio is the
    network's; the bare batch-of-windows figure is printed beside it. Each CPU provider this
    onnxruntime has is timed on its own (the plain CPU provider, and OpenVINO with
    ``onnxruntime-openvino``). Each figure is the fastest of ``repeats`` calls (of ``repeats`` turns
    of 10 calls for windows), all runtimes taking turns. PyTorch keeps its threads for the bare
    windows; ``OnnxPredictor`` gives them up around a case's window loop.

    Returns:
        Seconds per case (``torch``, one per provider: ``CPUExecutionProvider``, ...), per window
        batch (``*_window``), ``onnxruntime`` / ``ratio`` for the provider predict picks, and each
        provider's speed-up over PyTorch (``ratio_<provider>``).
    """
    from .export import export_onnx
    from .inference import Predictor
    from .inference.onnx_runtime import onnx_predictor, providers

    dev = torch.device("cpu")
    cfg, model, task, meta = _demo_segmenter(dev, patch)
    image = _random_ct(shape_zyx)
    names = [p[0] if isinstance(p, tuple) else p for p in providers("cpu")]  # predict's pick first
    tmp = Path(tempfile.mkdtemp(prefix="med3d-bench-"))
    try:
        export_onnx(model, tmp / "model.onnx", patch, meta=meta)
        runners = {"torch": Predictor(model, meta, dev),
                   **{name: onnx_predictor(tmp / "model.onnx", "cpu", name) for name in names}}
        x = torch.randn(sw_batch_size, 1, *patch)
        cases = {name: (lambda p=p: p(image, task, overlap=overlap, sw_batch_size=sw_batch_size))
                 for name, p in runners.items()}
        with torch.inference_mode():
            windows = {f"{name}_window": (lambda p=p: p.model(x, task)) for name, p in runners.items()}
            times: Dict[str, Any] = {**_fastest_interleaved(cases, repeats),
                                     **_fastest_interleaved(windows, repeats, block=10)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in names:
        times[f"ratio_{name}"] = times["torch"] / times[name]
    times["onnxruntime"], times["ratio"] = times[names[0]], times[f"ratio_{names[0]}"]
    print(f"volume {list(shape_zyx)} (z, y, x), window {list(patch)}, overlap {overlap}, sw batch {sw_batch_size}, "
          f"{cfg.model.encoder.arch} widths {cfg.model.encoder.widths}, cpu, torch threads {torch.get_num_threads()}")
    print(f"{'onnxruntime provider':>28} {'PyTorch eager':>14} {'onnxruntime':>12} {'speed-up':>9}")
    for name in names:
        short = name.replace("ExecutionProvider", "")
        print(f"{short + ', s/case':>28} {times['torch']:>14.2f} {times[name]:>12.2f} "
              f"{times['torch'] / times[name]:>8.2f}x")
        print(f"{short + ', s/window batch':>28} {times['torch_window']:>14.3f} {times[name + '_window']:>12.3f} "
              f"{times['torch_window'] / times[name + '_window']:>8.2f}x")
    print(f"med3d predict picks {names[0]}")
    return times


def memory_bench(shape_zyx: Sequence[int] = (96, 256, 256), num_classes: int = 2, patch: Sequence[int] = (32, 64, 64),
                 spacing: Sequence[float] = (2.0, 1.4, 1.4)) -> Dict[str, Any]:
    """Peak resident memory of ``prepare``, ``predict`` and ``evaluate`` on a generated chest CT.

    The CT (int16, 1 x 0.7 x 0.7 mm) and its lung label are written as a one-case dataset; the plan
    resamples to ``spacing`` (so prepare resamples and predict restores), and an untrained
    checkpoint with ``num_classes`` classes carries it. The three commands then run in one fresh
    process (``bench_memory.stage_peaks``), each figure given above the import baseline and in
    float32 copies of the input volume, the unit of the design bound.

    Returns:
        ``baseline`` MiB, ``one_copy_mb`` and per command its peak MiB and copies above the baseline.
    """
    from .bench_memory import PEAK_BOUND_COPIES, stage_peaks, write_checkpoint, write_ct_dataset
    from .data.cache import plan_dataset
    from .data.datalist import read_dataset

    tmp = Path(tempfile.mkdtemp(prefix="med3d-bench-"))
    try:
        root = tmp / "Chest"
        image, _ = write_ct_dataset(root, shape_zyx)
        plan = plan_dataset(read_dataset(root), tmp / "plan", spacing=spacing)  # the plan prepare will make
        ckpt = write_checkpoint(tmp / "model.pt", plan, num_classes, patch)
        peaks = stage_peaks([
            ("prepare", ["prepare", str(root), "--cache", str(tmp / "cache"), "--workers", "0", "--quiet",
                         "--spacing", *[str(v) for v in spacing]]),
            ("predict", ["predict", str(ckpt), str(image), "--out", str(tmp / "pred"), "--quiet"]),
            ("evaluate", ["evaluate", str(tmp / "pred"), str(root / "labelsTr"), "--no-plot", "--quiet"])])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one = float(np.prod(shape_zyx)) * 4 / 2 ** 20
    out: Dict[str, Any] = {"baseline": peaks["baseline"], "one_copy_mb": one}
    print(f"generated CT {list(shape_zyx)} (z, y, x) int16 at 1 x 0.7 x 0.7 mm, plan {list(spacing)} mm, "
          f"{num_classes} classes, window {list(patch)}; one float32 copy = {one:.0f} MiB")
    print(f"baseline (torch, MONAI, med3d imported): {peaks['baseline']:.0f} MiB")
    print(f"{'command':<9} {'peak MiB':>9} {'above baseline':>15} {'float32 copies':>15}")
    for name in ("prepare", "predict", "evaluate"):
        above = peaks[name] - peaks["baseline"]
        out[name] = {"peak_mb": peaks[name], "copies": above / one, "rc": peaks[f"{name}_rc"]}
        bound = f"  (goal <= {PEAK_BOUND_COPIES:g})" if name != "evaluate" else ""
        print(f"{name:<9} {peaks[name]:>9.0f} {above:>15.0f} {above / one:>15.2f}{bound}")
    return out


SCALING_SIZES = ((64, 64, 64), (64, 128, 128), (128, 128, 128), (128, 256, 256), (256, 256, 256))
LARGE_SIZE = (400, 512, 512)


def _window_count(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Sliding windows MONAI places over ``shape`` (its own slicing)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size = tuple(max(s, p) for s, p in zip(shape, patch))
    return len(dense_patch_slices(size, tuple(patch), _get_scan_interval(size, tuple(patch), 3, (overlap,) * 3)))


def scaling_bench(sizes: Sequence[Sequence[int]] = SCALING_SIZES, patch: Sequence[int] = (32, 64, 64),
                  overlap: float = 0.5, sw_batch_size: int = 2, repeats: int = 1, large: bool = False,
                  device: Optional[str] = None, cpu_time: bool = False) -> List[Dict[str, Any]]:
    """Seconds per case of ``med3d predict`` (the ``Predictor``) against volume size: is the cost linear?

    The demo encoder with one Med3D head on random volumes already on the plan grid; the per-voxel
    and per-window columns should stay flat if cost grows linearly. ``large`` adds a 400x512x512
    volume (about a minute per call on 2 CPU cores). ``cpu_time``: CPU seconds on one thread (see
    ``one_thread_cpu``), steadier on a shared machine.

    Returns:
        One row per size: ``shape``, ``voxels``, ``windows``, ``seconds``, ``ns_per_voxel``, ``ms_per_window``.
    """
    from .inference import Predictor

    dev = resolve_device(device)
    cfg, model, task, meta = _demo_segmenter(dev, patch)
    predictor = Predictor(model, meta, dev)
    sizes = [tuple(s) for s in sizes] + ([LARGE_SIZE] if large else [])
    clock_name = "CPU time on 1 thread" if cpu_time else f"torch threads {torch.get_num_threads()}"
    print(f"window {list(patch)}, overlap {overlap}, sw batch {sw_batch_size}, {cfg.model.encoder.arch} widths "
          f"{cfg.model.encoder.widths}, {dev}, {clock_name}; fastest of {repeats}")
    print(f"{'volume (z, y, x)':>18} {'Mvoxels':>8} {'windows':>8} {'s/case':>8} {'ns/voxel':>9} {'ms/window':>10}")
    rows = []
    warm = True
    for shape in sizes:
        image = _random_ct(shape)
        call = lambda im=image: predictor(im, task, overlap=overlap, sw_batch_size=sw_batch_size)  # noqa: E731
        with one_thread_cpu(cpu_time) as clock:
            if warm:
                call()  # first call: thread pools and kernels start up
                warm = False
            best = min(_timed(call, clock) for _ in range(repeats))
        n, windows = int(np.prod(shape)), _window_count(shape, patch, overlap)
        rows.append({"shape": list(shape), "voxels": n, "windows": windows, "seconds": best,
                     "ns_per_voxel": best / n * 1e9, "ms_per_window": best / windows * 1e3})
        r = rows[-1]
        print(f"{'x'.join(map(str, shape)):>18} {n / 1e6:>8.2f} {windows:>8} {best:>8.2f} {r['ns_per_voxel']:>9.1f} "
              f"{r['ms_per_window']:>10.1f}")
        del image, call  # the large volume goes before the next one is made
    return rows


def _timed(fn, clock=time.perf_counter) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def loop_bench(iterations: int = 40, batch: int = 2, patch: Sequence[int] = (32, 64, 64), workers: int = 1,
               n_cases: int = 4) -> Dict[str, Any]:
    """The training loop's throughput against the model-only step: does the data keep up? (CPU)

    The loop: ``med3d pretrain`` on generated spleen demo data (prepared cache, foreground
    sampling, augmentation, ``workers`` loader processes), timed between its first and last logged
    step (start-up excluded). The model-only step: the same model, loss, optimizer and kernels on
    one batch held in memory. A ratio below 1 means the loop waits for data (or spends time
    elsewhere: logging, scheduler).

    Returns:
        ``loop`` and ``model`` samples/s and ``ratio`` = loop / model.
    """
    from .config import from_dict, load_config, to_dict
    from .data.demo import write_demo_data
    from .engine.logger import read_metrics
    from .engine.optim import build_optimizer
    from .engine.trainer import train, training_kernels
    from .api import create_model
    from .resources import resource_path
    from .tasks.segmentation import SegLoss

    task = "Task09_SpleenDemo"
    tmp = Path(tempfile.mkdtemp(prefix="med3d-bench-"))
    try:
        write_demo_data(tmp / "raw", n_train=n_cases, n_test=0, tasks=[task], show_progress=False)
        d = to_dict(load_config(resource_path("configs/demo/pretrain.yaml")))
        d["model"]["heads"] = {task: {"type": "med3d", "num_classes": 2}}
        d["data"].update(datasets={task: {"path": str(tmp / "raw" / task)}}, cache_dir=str(tmp / "cache"),
                         patch_size=list(patch), workers=workers, val_fraction=0.0)
        d["run"]["out_dir"] = str(tmp / "run")
        first = max(2, iterations // 4)  # the window starts after loader start-up and the first batches
        d["train"].update(iterations=iterations, batch_size=batch, checkpoint_every=iterations, log_every=first)
        d["validation"].update(every=0, allow_none=True)
        cfg = from_dict(d)
        train(cfg, "pretrain", progress=False, tensorboard=False)
        logged = [r for r in read_metrics(tmp / "run" / "metrics.jsonl") if r.get("kind") == "train"]
        a, b = logged[0], logged[-1]
        seen_a, seen_b = a["iteration"] * batch, b["iteration"] * batch
        loop = (seen_b - seen_a) / (seen_b / b["samples_per_s"] - seen_a / a["samples_per_s"])
        torch.manual_seed(0)
        model = create_model(cfg).train()
        opt = build_optimizer(model, cfg)
        loss_fn = SegLoss()
        x, y = torch.randn(batch, 1, *patch), torch.randint(0, 2, (batch, 1, *patch))
        amp = torch.bfloat16 if cfg.train.amp == "bf16" else None

        def step() -> None:
            opt.zero_grad()
            with training_kernels(amp, torch.device("cpu")):
                with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                    out = model(x, task)
                loss_fn(out, y).backward()
            opt.step()

        model_rate = batch / _seconds_per_call(step, b["iteration"] - a["iteration"], torch.device("cpu"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"loop": loop, "model": model_rate, "ratio": loop / model_rate}
    print(f"{cfg.model.encoder.arch} widths {cfg.model.encoder.widths} + Med3D head, batch {batch}, "
          f"patch {list(patch)}, {cfg.train.optimizer}, loader workers {workers}, cpu, "
          f"torch threads {torch.get_num_threads()}; steps {a['iteration']}..{b['iteration']} of {iterations}")
    print(f"training loop: {loop:.2f} samples/s; model-only step: {model_rate:.2f} samples/s; "
          f"ratio {res['ratio']:.2f} (below 1: the loop waits for data or other work)")
    return res
