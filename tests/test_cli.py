import configparser
import importlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from med3d.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["demo-data", "check-data", "prepare", "pretrain", "finetune", "predict", "evaluate", "export",
            "inflate", "bench", "demo", "weights", "config", "encoders", "explain",
            "analyze", "study", "new-dataset", "new-config"]


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "med3d.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def one_line_error(stderr: str, command: str) -> str:
    """The single stderr line of a bad-input exit, checked to be the CLI's one-line form."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"med3d {command}: error: "), lines[0]
    return lines[0]


def torchvision_resnet18_2d() -> dict:
    """A 2D ResNet-18 state dict in torchvision's names (MONAI's 2D ResNet uses the same keys)."""
    from monai.networks import nets

    torch.manual_seed(0)
    net = nets.ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                      n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B",
                      bias_downsample=False, num_classes=10)
    return net.state_dict()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: med3d " + command in capsys.readouterr().out


def test_console_script_and_module_entry_points():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    target = cfg["options.entry_points"]["console_scripts"].split("=", 1)[1].strip()
    module, attr = target.split(":")
    assert getattr(importlib.import_module(module), attr) is main
    r = run_cli("--version")  # python -m med3d.cli, the form torchrun uses
    assert r.returncode == 0 and r.stdout.startswith("med3d ")


def test_demo_data_refuses_to_overwrite(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path), "--train", "1", "--test", "0", "--tasks", "Task09_SpleenDemo"]) == 0
    assert main(["demo-data", str(tmp_path), "--tasks", "Task09_SpleenDemo"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo-data", str(tmp_path), "--tasks", "NoSuchTask"]) == 2


@pytest.mark.slow
def test_channel_mismatch_between_data_and_encoder_is_one_line(tmp_path):
    r = run_cli("demo", "--quick", "--quiet", "--out", tmp_path, "--set", "model.encoder.in_channels=2")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "has 4 channels but the encoder takes 2" in last and "input_policy" in last
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_demo_quick_runs_the_whole_workflow(tmp_path):
    r = run_cli("demo", "--quick", "--quiet", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretrained encoder" in r.stdout and "from scratch" in r.stdout
    assert (tmp_path / "encoder.safetensors").is_file()
    for run in ("pretrain", "finetune_pretrained", "finetune_scratch"):
        assert (tmp_path / run / "checkpoints" / "last.pt").is_file(), run
    assert "loaded" in (tmp_path / "finetune_pretrained" / "load_report.txt").read_text()
    assert not (tmp_path / "finetune_scratch" / "load_report.txt").exists()


def test_parser_lists_all_commands():
    text = build_parser().format_help()
    for c in COMMANDS:
        assert c in text


@pytest.mark.slow
def test_benchmarks_run_and_report_ratios(capsys):
    from med3d.bench import infer_bench, loader_bench

    rows = loader_bench(workers=[0], n=3)
    assert rows[0]["med3d"] > 0 and rows[0]["ratio"] == rows[0]["med3d"] / rows[0]["monai"]
    times = infer_bench(shape_zyx=(24, 64, 64), patch=(16, 32, 32))
    assert set(times) == {"monai", "med3d", "monai_beside", "med3d_beside"}
    out = capsys.readouterr().out
    assert "ratio" in out and "MONAI decode" in out


@pytest.mark.slow
def test_memory_scaling_and_loop_benchmarks_run_in_a_tiny_configuration(capsys):
    """``med3d bench memory / scaling / loop`` (issue #15 part 5), tiny, so they do not rot; no speed asserted."""
    from med3d.bench import loop_bench, memory_bench, scaling_bench

    mem = memory_bench(shape_zyx=(16, 32, 32), patch=(8, 16, 16))
    assert mem["baseline"] > 100 and mem["one_copy_mb"] == 16 * 32 * 32 * 4 / 2 ** 20
    for name in ("prepare", "predict", "evaluate"):
        assert mem[name]["rc"] == 0 and mem[name]["peak_mb"] > 0
    rows = scaling_bench(sizes=[(8, 16, 16), (16, 16, 32)], patch=(8, 16, 16), repeats=1, cpu_time=True)
    assert [r["windows"] for r in rows] == [1, 3 * 1 * 3] and all(r["seconds"] > 0 for r in rows)
    assert rows[1]["ns_per_voxel"] == pytest.approx(rows[1]["seconds"] / (16 * 16 * 32) * 1e9)
    loop = loop_bench(iterations=4, patch=(16, 32, 32), workers=0, n_cases=2)
    assert loop["ratio"] == pytest.approx(loop["loop"] / loop["model"]) and loop["loop"] > 0
    out = capsys.readouterr().out
    assert "float32 copies" in out and "ns/voxel" in out and "model-only step" in out


# ------------------------------------------------------------------ shipped files

def test_config_falls_back_to_the_shipped_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names mean the shipped files
    # (first the file by its full path, from the same folder: a shipped template's data paths name the working folder)
    assert main(["config", str(REPO / "configs" / "demo" / "pretrain.yaml")]) == 0
    expected = capsys.readouterr().out
    for name in ("configs/demo/pretrain.yaml", "demo/pretrain.yaml"):
        assert main(["config", name]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == expected
    assert main(["config", "configs/demo/no_such.yaml"]) == 2
    assert "no_such.yaml: config file not found" in one_line_error(capsys.readouterr().err, "config")
    # a file of that name in the working folder wins over the shipped one
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "pretrain.yaml").write_text("train: {lr: 0.123}\n")
    assert main(["config", "demo/pretrain.yaml"]) == 0 and "lr: 0.123" in capsys.readouterr().out


def test_config_help_says_it_falls_back(capsys):
    with pytest.raises(SystemExit):
        main(["config", "--help"])
    assert "shipped with med3d" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_install_without_shipped_files_fails_in_one_line(tmp_path):
    """A med3d package without configs/, datasets/ or weights/ beside it (a broken install)."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "med3d", site / "med3d", ignore=shutil.ignore_patterns("__pycache__", "_resources"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = run_cli("weights", "list", cwd=tmp_path, env=env)
    assert r.returncode == 2
    line = one_line_error(r.stderr, "weights")
    assert "weights/index.yaml: not found among med3d's shipped files" in line and "reinstall" in line
    r = run_cli("demo", "--quick", "--quiet", "--out", tmp_path / "demo", cwd=tmp_path, env=env)
    assert r.returncode == 2
    assert "configs/demo/pretrain.yaml: not found" in one_line_error(r.stderr, "demo")
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------ transfer commands

@pytest.mark.slow
def test_inflate_reports_the_load_once(tmp_path):
    src = tmp_path / "resnet18-2d.pth"
    torch.save(torchvision_resnet18_2d(), src)
    r = run_cli("inflate", src, "--arch", "resnet18", "--out", tmp_path / "r18.safetensors")
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("tensors from a") == 1, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"wrote {tmp_path / 'r18.safetensors'}"


def test_export_reports_the_load_once(tmp_path, capsys, caplog):
    from med3d.transfer.formats import read_weights

    src = tmp_path / "resnet18-2d.pth"
    torch.save(torchvision_resnet18_2d(), src)
    assert main(["inflate", str(src), "--arch", "resnet18", "--out", str(tmp_path / "e.safetensors")]) == 0
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="med3d"):
        assert main(["export", str(tmp_path / "e.safetensors"), "--format", "pt", "--out", str(tmp_path / "e.pt")]) == 0
    out = capsys.readouterr().out
    assert "tensors from a" not in out and out.strip() == f"wrote {tmp_path / 'e.pt'} (pt)"
    assert sum("tensors from a" in r.getMessage() for r in caplog.records) == 1
    exported, source = (read_weights(tmp_path / f).state_dict for f in ("e.pt", "e.safetensors"))
    assert exported.keys() == source.keys()


@pytest.mark.slow
def test_inflate_bad_files_are_one_line(tmp_path, capsys):
    sd = torchvision_resnet18_2d()
    no_stem = tmp_path / "no_stem.pth"  # 2D kernels, but the stem conv is missing
    torch.save({k: v for k, v in sd.items() if k != "conv1.weight"}, no_stem)
    r = run_cli("inflate", no_stem, "--arch", "resnet18", "--out", tmp_path / "a.safetensors")
    assert r.returncode == 2
    line = one_line_error(r.stderr, "inflate")
    assert f"{no_stem}: holds 2D kernels but no conv1.weight" in line
    odd_stem = tmp_path / "odd_stem.pth"
    torch.save({**sd, "conv1.weight": sd["conv1.weight"][:, :, :, :, None]}, odd_stem)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    cases = [
        ([str(odd_stem)], "conv1.weight of shape [64, 3, 7, 7, 1]"),
        ([str(text)], "not a readable PyTorch checkpoint"),
        ([str(tmp_path / "absent.pth")], "absent.pth: weights file not found"),
        ([str(no_stem.with_name("good.pth")), "--in-channels", "0"], "in_channels must be at least 1"),
        ([str(no_stem.with_name("good.pth")), "--arch", "resnet34"], "resnet34"),
    ]
    torch.save(sd, no_stem.with_name("good.pth"))
    for args, message in cases:
        arch = [] if "--arch" in args else ["--arch", "resnet18"]
        assert main(["inflate", *args, *arch, "--out", str(tmp_path / "b.safetensors")]) == 2, args
        assert message in one_line_error(capsys.readouterr().err, "inflate"), args
        assert not (tmp_path / "b.safetensors").exists()


def test_weights_verify_without_a_file_is_one_line(capsys):
    assert main(["weights", "verify"]) == 2
    assert "give the FILE to verify" in one_line_error(capsys.readouterr().err, "weights")


@pytest.mark.slow
def test_a_reader_that_goes_away_is_not_a_traceback():
    """``med3d ... | head -1``: the pipe closes before med3d writes; it stops quietly (no BrokenPipeError)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "med3d.cli", "config", "--schema"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_an_unknown_or_absent_device_is_one_line(device):
    """Checked where the user names it (predict, explain, bench, analyze share it), never a torch traceback."""
    from med3d.device import resolve_device
    from med3d.errors import Med3DError

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    with pytest.raises(Med3DError, match=f"--device {device}: "):
        resolve_device(device)
    assert resolve_device("cpu").type == "cpu"


def test_predict_with_an_unknown_device_exits_2_in_one_line(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from med3d.api import create_model
    from med3d.checkpoint import save_checkpoint
    from med3d.config import from_dict

    # a checkpoint the predictor can open, so that the device is what fails
    cfg = from_dict({"model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
                               "heads": {"T": {"type": "med3d", "num_classes": 2}}}})
    ckpt = save_checkpoint(tmp_path / "m.pt", create_model(cfg), cfg)
    scan = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), scan)
    assert main(["predict", str(ckpt), str(scan), "--out", str(tmp_path / "o"), "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device tpu" in err


def test_the_command_line_answers_help_and_bad_arguments_without_loading_torch():
    """Help texts and choices come from med3d.choices; PyTorch (about 2 s to import) waits for a command's work."""
    code = ("import sys\n"
            "from med3d.cli import build_parser, main\n"
            "for argv in (['--version'], ['export', '--help'], ['analyze', '--help'], ['explain', '--help'],\n"
            "             ['inflate', '--help'], ['export', 'm.pt', '--format', 'bogus'],\n"
            "             ['explain', 'm.pt', 's.nii', '--out', 'o', '--method', 'bogus']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'monai', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_public_names_and_submodules_load_on_first_use():
    import med3d

    assert med3d.create_model is med3d.api.create_model and callable(med3d.predict)
    assert {"create_model", "predict", "Med3DError"} <= set(dir(med3d))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        med3d.nothing  # noqa: B018
