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


def test_planned_command_says_so(capsys):
    assert main(["pretrain", "cfg.yaml"]) == 2
    err = capsys.readouterr().err
    assert "not available" in err and err.count("\n") == 1


def test_demo_data_refuses_to_overwrite(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path), "--train", "1", "--test", "0", "--tasks", "Task09_SpleenDemo"]) == 0
    assert main(["demo-data", str(tmp_path), "--tasks", "Task09_SpleenDemo"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo-data", str(tmp_path), "--tasks", "NoSuchTask"]) == 2


def test_wrong_channel_count_at_forward_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "demo", "--quick", "--set", f"run.out_dir={tmp_path}",
                        "--set", "model.encoder.in_channels=2"], capture_output=True, text=True)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "1 channel(s) but the encoder resnet10 expects 2" in last
    assert "Traceback" not in r.stderr


def test_parser_lists_all_commands():
    text = build_parser().format_help()
    for c in COMMANDS:
        assert c in text
