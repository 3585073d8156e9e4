"""``med3d demo``: the whole Med3D workflow on generated data, on a laptop CPU.

1. write the four segmentation demo tasks and the nodule classification task (Decathlon layout);
2. pretrain a small shared encoder on three segmentation tasks (one head each);
3. export the encoder (safetensors with metadata);
4. fine-tune on the fourth (spleen CT, one training case) from that encoder, and from scratch
   with the same budget; print Dice of both and how many iterations each needed to reach the
   scratch run's final Dice;
5. the same comparison for classification: benign vs malignant nodule-like lesions, a
   classification head on the same encoder against one trained from scratch; print AUC.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

from .config import Config, load_config
from .data.demo import NODULE_DEMO, TASK_NAMES, is_complete, write_demo_data, write_nodule_demo
from .engine.trainer import describe, train
from .export import export_encoder
from .resources import resource_path
from .study.runs import iterations_to_reach


def _configs(out: Path, overrides: Sequence[str], quick: bool) -> Dict[str, Config]:
    """The five run configs with every path under ``out`` (user overrides apply to all of them)."""
    data, cache = out / "data", out / "cache"
    common = [f"data.cache_dir={cache}"]
    if quick:
        common += ["train.iterations=12", "validation.every=6", "train.checkpoint_every=12", "data.workers=0"]
    pre = [f"data.datasets.{t}.path={data / t}" for t in TASK_NAMES[:3]]
    ft = [f"data.datasets.{TASK_NAMES[3]}.path={data / TASK_NAMES[3]}",
          f"finetune.weights={out / 'encoder.safetensors'}"]
    cls = [f"data.datasets.{NODULE_DEMO}.path={data / NODULE_DEMO}", f"finetune.weights={out / 'encoder.safetensors'}"]
    return {
        "pretrain": load_config(resource_path("configs/demo/pretrain.yaml"),
                                [*pre, *common, f"run.out_dir={out / 'pretrain'}", *overrides]),
        "pretrained": load_config(resource_path("configs/demo/finetune.yaml"),
                                  [*ft, *common, f"run.out_dir={out / 'finetune_pretrained'}", *overrides]),
        "scratch": load_config(resource_path("configs/demo/finetune.yaml"),
                               [*ft, *common, f"run.out_dir={out / 'finetune_scratch'}", "finetune.init=scratch",
                                *overrides]),
        "classify_pretrained": load_config(resource_path("configs/demo/classify.yaml"),
                                           [*cls, *common, f"run.out_dir={out / 'classify_pretrained'}",
                                            *overrides]),
        "classify_scratch": load_config(resource_path("configs/demo/classify.yaml"),
                                        [*cls, *common, f"run.out_dir={out / 'classify_scratch'}",
                                         "finetune.init=scratch", *overrides]),
    }


def run_demo(overrides: Sequence[str] = (), quick: bool = False, out_dir: str = "runs/demo",
             progress: bool = True) -> int:
    """Run the demo; writes everything under ``out_dir`` and prints the comparison table.

    The demo owns ``out_dir``: running it again replaces its earlier runs there (``train(overwrite=True)``).
    """
    out = Path(out_dir)
    cfgs = _configs(out, overrides, quick)
    data = out / "data"
    missing = [t for t in TASK_NAMES if not is_complete(data / t)]
    if missing:
        n_train, n_test = (5, 1) if quick else (10, 2)
        print(f"writing demo data ({n_train} training cases per task) to {data}")
        write_demo_data(data, seed=cfgs["pretrain"].run.seed, n_train=n_train, n_test=n_test, tasks=missing,
                        show_progress=progress)
    if not is_complete(data / NODULE_DEMO):
        write_nodule_demo(data, n_train=16 if quick else 48, n_test=2, seed=cfgs["pretrain"].run.seed)

    print(f"\n[1/5] pretraining on {', '.join(TASK_NAMES[:3])}")
    pre = train(cfgs["pretrain"], "pretrain", progress=progress, overwrite=True)
    print(describe(pre))
    from .checkpoint import load_checkpoint

    model, _, meta = load_checkpoint(Path(cfgs["pretrain"].run.out_dir) / "checkpoints" / "last.pt")
    enc_path = export_encoder(model, "safetensors", out / "encoder.safetensors", overwrite=True,
                              meta={**meta, "job": "med3d demo"})
    print(f"encoder exported to {enc_path}")

    print(f"\n[2/5] fine-tuning on {TASK_NAMES[3]} from the pretrained encoder")
    ft = train(cfgs["pretrained"], "finetune", progress=progress, overwrite=True)
    print(describe(ft))
    print(f"\n[3/5] fine-tuning on {TASK_NAMES[3]} from scratch (same budget)")
    sc = train(cfgs["scratch"], "finetune", progress=progress, overwrite=True)
    print(describe(sc))

    target = sc["final"]["mean_dice"]
    rows = [("pretrained encoder", ft), ("from scratch", sc)]
    print(f"\n{TASK_NAMES[3]}: {cfgs['scratch'].data.train_cases} training cases, "
          f"{cfgs['scratch'].train.iterations} iterations each")
    print(f"{'initialisation':<20} {'final Dice':>10} {'best Dice':>10} {'iterations to reach scratch final':>34}")
    for name, s in rows:
        reach = iterations_to_reach(s["history"], target)
        best = s["best"]["metric"]
        print(f"{name:<20} {s['final']['mean_dice']:>10.3f} {best if best is not None else float('nan'):>10.3f} "
              f"{str(reach) if reach is not None else 'not reached':>34}")
    _classification(cfgs, progress)
    print(f"\noutputs under {out}: pretrain/, finetune_pretrained/, finetune_scratch/, classify_pretrained/, "
          "classify_scratch/, encoder.safetensors")
    return 0


CLASSIFY_LEVEL = 0.95  # the AUC whose first validated iteration shows how much sooner one run gets there


def _classification(cfgs: Dict[str, Config], progress: bool) -> None:
    """Steps 4 and 5: the nodule classifier from the shared encoder and from scratch, and their AUC."""
    print(f"\n[4/5] classifying {NODULE_DEMO} from the pretrained encoder")
    pre = train(cfgs["classify_pretrained"], "finetune", progress=progress, overwrite=True)
    print(describe(pre))
    print(f"\n[5/5] classifying {NODULE_DEMO} from scratch (same budget)")
    sc = train(cfgs["classify_scratch"], "finetune", progress=progress, overwrite=True)
    print(describe(sc))
    cfg = cfgs["classify_scratch"]
    print(f"\n{NODULE_DEMO}: {cfg.data.train_cases} training cases, {cfg.train.iterations} iterations each")
    print(f"{'initialisation':<20} {'final AUC':>10} {'best AUC':>10} {'balanced accuracy':>18} "
          f"{f'iterations to AUC {CLASSIFY_LEVEL}':>24}")
    for name, s in (("pretrained encoder", pre), ("from scratch", sc)):
        entry = s["final"]["tasks"][NODULE_DEMO]
        best = s["best"]["metric"]
        reach = iterations_to_reach(s["history"], CLASSIFY_LEVEL)
        print(f"{name:<20} {entry['auc']:>10.3f} {best if best is not None else float('nan'):>10.3f} "
              f"{entry['balanced_accuracy']:>18.3f} {str(reach) if reach is not None else 'not reached':>24}")
