import subprocess
import sys

import pytest

from med3d.cli import build_parser, main

COMMANDS = ["demo-data", "check-data", "prepare", "pretrain", "finetune", "predict", "evaluate", "export",
            "inflate", "bench", "demo", "weights", "config", "encoders"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: med3d " + command in capsys.readouterr().out


def test_demo_data_refuses_to_overwrite(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path), "--train", "1", "--test", "0", "--tasks", "Task09_SpleenDemo"]) == 0
    assert main(["demo-data", str(tmp_path), "--tasks", "Task09_SpleenDemo"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo-data", str(tmp_path), "--tasks", "NoSuchTask"]) == 2


def test_channel_mismatch_between_data_and_encoder_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "demo", "--quick", "--quiet", "--out", str(tmp_path),
                        "--set", "model.encoder.in_channels=2"], capture_output=True, text=True)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "has 4 channels but the encoder takes 2" in last and "input_policy" in last
    assert "Traceback" not in r.stderr


def test_demo_quick_runs_the_whole_workflow(tmp_path):
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "demo", "--quick", "--quiet", "--out", str(tmp_path)],
                       capture_output=True, text=True)
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


def test_benchmarks_run_and_report_ratios(capsys):
    from med3d.bench import infer_bench, loader_bench

    rows = loader_bench(workers=[0], n=3)
    assert rows[0]["med3d"] > 0 and rows[0]["ratio"] == rows[0]["med3d"] / rows[0]["monai"]
    times = infer_bench(shape_zyx=(24, 64, 64), patch=(16, 32, 32))
    assert set(times) == {"monai", "med3d"}
    out = capsys.readouterr().out
    assert "ratio" in out and "MONAI decode" in out
