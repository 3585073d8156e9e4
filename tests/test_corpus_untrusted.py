"""Bad-input corpus, class 7: untrusted files cannot stall the process.

Each case generates a small hostile file (a deflated pickle that expands to tens of megabytes of
opcodes, a storage declaration of terabytes, a YAML alias bomb, an endless ``_base_`` chain, ...)
and requires a one-line refusal before the expensive part starts: ``torch.load`` never sees the
weight files, and the YAML is never constructed. Run through the CLI where a command reads the file
(``export`` reads weights first, ``config`` resolves a config), through the library otherwise.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import time
import zipfile
from pathlib import Path
from typing import Iterable

import pytest
import torch

from badinput import refused
from med3d.errors import Med3DError
from med3d.transfer import load_pretrained
from med3d.transfer.formats import read_weights
from med3d.api import create_encoder



# ---------------------------------------------------------------- generators

def _torch_zip(path: Path, pickle_chunks: Iterable[bytes], replace: str = "data.pkl") -> Path:
    """A real ``torch.save`` archive of a one-tensor state dict whose entry ``replace`` is streamed from
    ``pickle_chunks``, deflated (torch reads deflated entries: a tiny file can expand to any size)."""
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(2)}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for info in src.infolist():
            if info.filename.endswith(replace):
                with out.open(info.filename, "w", force_zip64=True) as fh:
                    for chunk in pickle_chunks:
                        fh.write(chunk)
            else:
                out.writestr(info.filename, src.read(info.filename))
    return path


def _original_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(2)}, buf)
    with zipfile.ZipFile(buf) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))


def _none_run(n_ops: int, original: bytes, chunk: int = 1 << 22) -> Iterable[bytes]:
    """``PROTO 2, MARK, NONE x n_ops, TUPLE`` then the real state dict's opcodes: a pickle that loads
    the right dict in the end, after ``n_ops`` steps of torch's pure-Python unpickler (~0.8 us each)."""
    yield original[:2] + b"("
    left = n_ops
    while left:
        step = min(left, chunk)
        yield b"N" * step
        left -= step
    yield b"t" + original[2:]


def _legacy_pickles(obj_pickle: bytes) -> bytes:
    """torch's legacy (non-zip) layout: magic number, protocol, sys_info, then the object's pickle."""
    head = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2) + \
        pickle.dumps({"protocol_version": 1001, "little_endian": True,
                      "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    return head + obj_pickle


def _storage_pickle(numel: int) -> bytes:
    """A legacy object pickle holding one FloatStorage of ``numel`` elements (torch allocates it on sight)."""
    key = b"X" + struct.pack("<I", 1) + b"0"
    num = b"\x8a" + bytes([8]) + numel.to_bytes(8, "little")  # LONG1
    pid = b"((X" + struct.pack("<I", 7) + b"storage" + b"ctorch\nFloatStorage\n" + key + \
        b"X" + struct.pack("<I", 3) + b"cpu" + num + b"Nt" + b"Q"
    args = b"K\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)R"  # offset, size, stride, grad, hooks
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n" + pid + args + b"tR"
    return b"\x80\x02}X" + struct.pack("<I", 1) + b"w" + rebuild + b"s."


def _safetensors(path: Path, metadata: dict, header_extra: bytes = b"") -> Path:
    header = {"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode() + header_extra
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    return path


def _lying_tensor(path: Path, numel: int) -> None:
    """A safetensors header declaring ``numel`` floats over 8 bytes of data."""
    raw = json.dumps({"w": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)


def _export_refused(path: Path, tmp_path: Path, capsys, names: str) -> str:
    """``med3d export FILE`` reads the weights before anything else; it must refuse, within seconds."""
    start = time.monotonic()
    line = refused(["export", path, "--out", tmp_path / "out.safetensors"], capsys, names=names,
                   inputs=[path], watch=tmp_path)
    assert time.monotonic() - start < 10, "the refusal took too long: the file was processed, not scanned"
    return line


# ---------------------------------------------------------------- weight files

@pytest.mark.corpus
def test_a_deflated_pickle_that_expands_past_the_limit_is_refused_unread(tmp_path, capsys):
    # 96 MiB of opcodes in a ~100 KB file: torch would inflate it and step through 100 M opcodes (minutes).
    bomb = _torch_zip(tmp_path / "bomb.pt", _none_run(96 << 20, _original_pickle()))
    assert bomb.stat().st_size < 1 << 20
    _export_refused(bomb, tmp_path, capsys, r"bomb\.pt: refused: its pickle .*data\.pkl declares 96\.0 MiB "
                                            r".*over the limit of 64\.0 MiB.*MED3D_MAX_PICKLE_BYTES")


@pytest.mark.corpus
@pytest.mark.slow  # ~1 s: the scan walks the first million opcodes
def test_a_pickle_of_millions_of_opcodes_is_refused_at_the_opcode_limit(tmp_path, capsys):
    # 40 M opcodes in 40 MB (under the size limit), deflated to ~40 KB; torch would run them for ~30 s.
    bomb = _torch_zip(tmp_path / "ops.pt", _none_run(40_000_000, _original_pickle()))
    _export_refused(bomb, tmp_path, capsys, r"ops\.pt: refused: its pickle runs past 1,000,000 opcodes.*"
                                            r"MED3D_MAX_PICKLE_OPS")


@pytest.mark.corpus
@pytest.mark.slow  # ~1 s: the scan walks the first million opcodes
def test_the_opcode_limit_holds_for_legacy_non_zip_files_too(tmp_path, capsys):
    original = _original_pickle()
    body = b"".join(_none_run(1_200_000, original))
    bomb = tmp_path / "legacy.pth"
    bomb.write_bytes(_legacy_pickles(body))
    _export_refused(bomb, tmp_path, capsys, r"legacy\.pth: refused: its pickle runs past 1,000,000 opcodes")


@pytest.mark.corpus
def test_a_storage_declared_larger_than_memory_is_refused_before_allocation(tmp_path, capsys):
    # torch's legacy reader allocates a declared storage before reading its bytes: 4 TB here.
    bomb = tmp_path / "alloc.pth"
    bomb.write_bytes(_legacy_pickles(_storage_pickle(10 ** 12)))
    _export_refused(bomb, tmp_path, capsys, r"alloc\.pth: refused: its pickle declares 3725\.29 GiB of tensor "
                                            r"storage, over the limit")


@pytest.mark.corpus
def test_a_storage_declared_larger_than_the_file_is_refused(tmp_path, capsys):
    bomb = tmp_path / "short.pth"
    bomb.write_bytes(_legacy_pickles(_storage_pickle(50_000_000)))  # 200 MB declared in a 400-byte file
    _export_refused(bomb, tmp_path, capsys, r"short\.pth: refused: its pickle declares 190\.7 MiB of tensor "
                                            r"storage but the file holds only")


@pytest.mark.corpus
def test_a_zip_whose_records_expand_past_the_weights_limit_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MED3D_MAX_WEIGHTS_BYTES", str(32 << 20))  # the limit defaults to the machine's memory
    zeros = (b"\0" * (1 << 22) for _ in range(12))  # a 48 MiB tensor record, deflated to ~50 KB
    bomb = _torch_zip(tmp_path / "big.pt", zeros, replace="data/0")
    _export_refused(bomb, tmp_path, capsys, r"big\.pt: refused: the archive declares 48\.0 MiB uncompressed, "
                                            r"over the limit of 32\.0 MiB.*MED3D_MAX_WEIGHTS_BYTES")


@pytest.mark.corpus
def test_a_zip_with_two_entries_of_one_name_is_refused(tmp_path, capsys):
    # zipfile reads the last copy, torch's reader may take the first: the scan must see what torch loads.
    path = tmp_path / "twin.pt"
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(2)}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
        pkl = next(n for n in src.namelist() if n.endswith("data.pkl"))
        with pytest.warns(UserWarning, match="Duplicate name"):
            out.writestr(pkl, src.read(pkl))
    _export_refused(path, tmp_path, capsys, r"twin\.pt: refused: the archive holds two entries of one name")


@pytest.mark.corpus
def test_a_zero_stride_view_that_would_expand_on_use_is_refused(tmp_path, capsys):
    # Saved as one float and a stride of 0: 10^10 elements as soon as anything copies or inflates it.
    path = tmp_path / "view.pt"
    torch.save({"conv1.weight": torch.zeros(1).expand(10 ** 5, 10 ** 5)}, path)
    _export_refused(path, tmp_path, capsys, r"view\.pt: refused: a tensor of shape \[100000, 100000\] claims "
                                            r"10,000,000,000 elements over a storage of 1")


@pytest.mark.corpus
def test_shared_containers_that_explode_when_walked_are_refused(tmp_path):
    # 2^40 paths through 40 shared lists: tiny on disk and in memory, endless for anything that walks it.
    nested: list = [0]
    for _ in range(40):
        nested = [nested, nested]
    path = tmp_path / "dag.pt"
    torch.save({"format": "med3d-checkpoint", "model": {"w": torch.zeros(1)}, "meta": {"plans": nested}}, path)
    start = time.monotonic()
    with pytest.raises(Med3DError, match=r"dag\.pt: refused: its data outside the tensors exceeds 200,000 values"):
        read_weights(path)
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- safetensors

@pytest.mark.corpus
@pytest.mark.parametrize("name, make, message", [
    ("header_length", lambda p: p.write_bytes(struct.pack("<Q", 2 ** 62) + b"{" + b" " * 16),
     r"not a readable safetensors file \(.*header too large"),
    ("beyond_file", lambda p: _lying_tensor(p, 10 ** 6),
     r"not a readable safetensors file \(.*(incomplete metadata|not fully covered)"),
    ("nested_metadata", lambda p: _safetensors(p, {"format": "med3d", "encoder": "[" * 100_000 + "]" * 100_000}),
     r"metadata 'encoder' nests more than 32 levels deep"),
    ("huge_metadata", lambda p: _safetensors(p, {"model_card": "x" * (2 << 20)}),
     r"metadata 'model_card' holds 2,097,152 characters, over the 1,048,576"),
])
def test_lying_or_crafted_safetensors_headers_are_refused_in_one_line(tmp_path, capsys, name, make, message):
    path = tmp_path / f"{name}.safetensors"
    make(path)
    _export_refused(path, tmp_path, capsys, rf"{name}\.safetensors: {message}")


# ---------------------------------------------------------------- YAML configs

def _config(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _config_refused(path: Path, tmp_path: Path, capsys, names: str) -> str:
    start = time.monotonic()
    line = refused(["config", path], capsys, names=names, inputs=[tmp_path], watch=tmp_path)
    assert time.monotonic() - start < 10
    return line


@pytest.mark.corpus
def test_a_billion_laughs_alias_bomb_is_refused(tmp_path, capsys):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 values
    path = _config(tmp_path, "laughs.yaml", "\n".join(lines) + "\n")
    _config_refused(path, tmp_path, capsys, r"laughs\.yaml: refused: its aliases expand to more than 100,000 values")


@pytest.mark.corpus
def test_a_merge_key_bomb_is_refused_before_pyyaml_copies_it(tmp_path, capsys):
    # Merge keys are copied while loading: 20 levels take PyYAML ~2 s, 30 levels ~30 min.
    lines = ["a0: &a0 {k: 1}"] + [f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}], k{i}: 1}}" for i in range(1, 30)]
    path = _config(tmp_path, "merge.yaml", "\n".join(lines) + "\n")
    _config_refused(path, tmp_path, capsys, r"merge\.yaml: refused: its aliases expand")


@pytest.mark.corpus
def test_deeply_nested_flow_yaml_is_refused_before_the_quadratic_scanner(tmp_path, capsys):
    path = _config(tmp_path, "deep.yaml", "train: " + "[" * 20_000 + "]" * 20_000 + "\n")
    _config_refused(path, tmp_path, capsys, r"deep\.yaml: refused: its YAML nests more than 64 levels deep")


@pytest.mark.corpus
def test_an_endless_base_chain_is_refused_with_the_depth_limit(tmp_path, capsys):
    for i in range(40):
        _config(tmp_path, f"c{i}.yaml", f"_base_: c{i + 1}.yaml\n")
    _config(tmp_path, "c40.yaml", "train: {lr: 0.1}\n")
    _config_refused(tmp_path / "c0.yaml", tmp_path, capsys,
                    r"c16\.yaml \(the _base_ of .*c15\.yaml\): _base_ files nest more than 16 deep \(from .*c0\.yaml\)")


@pytest.mark.corpus
def test_a_base_fan_out_that_reads_thousands_of_files_is_refused(tmp_path, capsys):
    for i in range(10):  # 3^10 reads through ten files
        _config(tmp_path, f"f{i}.yaml", f"_base_: [f{i + 1}.yaml, f{i + 1}.yaml, f{i + 1}.yaml]\n")
    _config(tmp_path, "f10.yaml", "{}\n")
    _config_refused(tmp_path / "f0.yaml", tmp_path, capsys, r"f0\.yaml: its _base_ files make more than 256 reads")


SECRET = "root:x:0:0:SECRET_TOKEN_123:/root:/bin/bash"


@pytest.mark.corpus
@pytest.mark.parametrize("name, content, message", [
    ("passwd", f"{SECRET}\ndaemon:x:1:1::/usr/sbin:/bin/false\n", r"a config must be a mapping of sections, got str"),
    ("syntax", f"ok: 1\n{SECRET}: [unclosed\n", r"not valid YAML \(line \d\); fix the syntax"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\xff" + SECRET.encode(), r"not a text file \(not UTF-8\)"),
    ("control", f"token: {SECRET}\x00\n", r"not valid YAML; fix the syntax"),
])
def test_an_arbitrary_file_named_as_base_is_named_never_quoted(tmp_path, capsys, name, content, message):
    base = tmp_path / f"{name}.txt"
    base.write_bytes(content if isinstance(content, bytes) else content.encode())
    path = _config(tmp_path, "uses.yaml", f"_base_: {base}\ntrain: {{lr: 0.1}}\n")
    line = _config_refused(path, tmp_path, capsys, rf"{name}\.txt \(the _base_ of .*uses\.yaml\): {message}")
    assert "SECRET" not in line and "root:x" not in line


@pytest.mark.corpus
def test_a_base_that_is_no_path_is_refused(tmp_path, capsys):
    path = _config(tmp_path, "intbase.yaml", "_base_: 5\n")
    _config_refused(path, tmp_path, capsys, r"intbase\.yaml: _base_ must be a file path or a list of them")


# ---------------------------------------------------------------- legitimate files still load

def test_real_checkpoints_pass_the_scan_in_both_torch_formats(tmp_path):
    enc = create_encoder("resnet18", widths=[8, 16, 32, 64])
    for name, zip_format in (("new.pt", True), ("legacy.pth", False)):
        path = tmp_path / name
        torch.save({"state_dict": {f"module.{k}": v for k, v in enc.state_dict().items()}}, path,
                   _use_new_zipfile_serialization=zip_format)
        report = load_pretrained(create_encoder("resnet18", widths=[8, 16, 32, 64]), path)
        assert not report.missing and not report.mismatched
