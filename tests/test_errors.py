"""Bad input and broken installs surface as one-line Med3DErrors naming the file or key."""
from pathlib import Path

import pytest
import torch

from med3d import resources
from med3d.errors import Med3DError
from med3d.registry import Registry
from med3d.transfer.inflate import inflate_kernel, inflate_state_dict
from med3d.weights_index import index_lines, read_index, verify_weights

REPO = Path(__file__).resolve().parents[1]


def test_registering_a_name_twice_names_it():
    reg = Registry("encoder")
    reg.register("tiny")(lambda: None)
    with pytest.raises(Med3DError, match="encoder 'tiny' registered twice"):
        reg.register("tiny")(lambda: None)


def test_inflating_a_kernel_that_is_not_2d_names_its_key():
    with pytest.raises(Med3DError, match=r"layer1\.0\.conv1\.weight: expected a 2D conv kernel"):
        inflate_kernel(torch.zeros(4, 4, 3), "i3d", name="layer1.0.conv1.weight")
    with pytest.raises(Med3DError, match="unknown inflation mode 'x'"):
        inflate_state_dict({"conv1.weight": torch.zeros(4, 3, 7, 7)}, "x")


def test_a_checkout_reads_the_top_level_folders():
    assert resources.resource_root() == REPO
    assert resources.resource_path("configs/demo/pretrain.yaml") == REPO / "configs" / "demo" / "pretrain.yaml"
    assert resources.resource_dir("datasets") == REPO / "datasets"


def test_a_wheel_reads_its_packaged_copy(tmp_path, monkeypatch):
    packaged = tmp_path / "med3d" / resources.PACKAGED
    (packaged / "weights").mkdir(parents=True)
    (packaged / "weights" / "index.yaml").write_text("{}\n")
    monkeypatch.setattr(resources._importlib_resources, "files", lambda _: tmp_path / "med3d")
    assert resources.resource_root() == packaged
    assert resources.resource_path("weights/index.yaml") == packaged / "weights" / "index.yaml"
    with pytest.raises(Med3DError, match=r"^configs: not found among med3d's shipped files .*reinstall med3d"):
        resources.resource_dir("configs")
    with pytest.raises(Med3DError, match="weights/index.yaml: expected a folder"):
        resources.resource_dir("weights/index.yaml")


def test_config_path_falls_back_only_for_relative_missing_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = REPO / "configs" / "demo" / "finetune.yaml"
    assert resources.config_path("configs/demo/finetune.yaml") == shipped
    assert resources.config_path("demo/finetune.yaml") == shipped
    for given in ("nope.yaml", "configs/demo/nope.yaml", "../configs/demo/finetune.yaml", str(tmp_path / "a.yaml")):
        assert resources.config_path(given) == Path(given)


def test_the_shipped_index_reads_and_lists():
    lines = index_lines(read_index())
    assert any(line.strip().startswith("resnet_50.pth") for line in lines)


@pytest.mark.parametrize("text,message", [
    ("a: [1\n", "not valid YAML"),
    ("- 1\n", "must map family names"),
    ("fam: {published: x}\n", "family 'fam' needs 'published' and a list of 'entries'"),
    ("fam: {published: x, entries: [{file: a.pth, arch: resnet18}]}\n", "fam entry 1 lacks 'shortcut'"),
])
def test_a_broken_index_is_one_line(tmp_path, text, message):
    path = tmp_path / "index.yaml"
    path.write_text(text)
    with pytest.raises(Med3DError, match=message):
        read_index(path)
    with pytest.raises(Med3DError, match="absent.yaml: weights index not found"):
        read_index(tmp_path / "absent.yaml")


def test_verify_reports_lines_and_the_reason_it_fails(tmp_path):
    fake = tmp_path / "resnet18-f37072fd.pth"  # named like torchvision's file, with the wrong hash
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, fake)
    result = verify_weights(fake)
    assert result.lines[0].startswith(f"{fake}: torchvision weights")
    assert "does not start with f37072fd" in result.error
    with pytest.raises(Med3DError, match="absent.pth: weights file not found"):
        verify_weights(tmp_path / "absent.pth")


def test_training_and_runner_configs_are_found_by_their_shipped_name_from_any_folder(tmp_path, monkeypatch):
    from med3d.config import load_config
    from med3d.study.grid import load_study
    from med3d.study.teacher_student import load_rounds

    monkeypatch.chdir(tmp_path)  # no configs/ here: an installed wheel's user in a project folder
    assert load_config("configs/demo/finetune.yaml").run.out_dir == "runs/demo/finetune"
    assert load_study("configs/demo/study.yaml").inits
    rounds = load_rounds("configs/demo/teacher_student.yaml")
    assert rounds.rounds == 2 and rounds.unlabelled == [str(tmp_path.resolve() / "runs/demo/data/Task09_SpleenDemo/imagesTs")]
