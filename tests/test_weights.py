"""Local weights: the sha256 manifest is enforced; state dicts load strictly or name what did not match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cytologia.cli import main
from cytologia.errors import CytologiaInputError
from cytologia.weights import add_to_manifest, load_state_dict_checked, read_manifest, verified_path


def _net(out: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, out))


def test_manifest_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    f = tmp_path / "net.pt"
    torch.save(_net().state_dict(), f)
    with pytest.raises(CytologiaInputError, match="not listed"):
        verified_path(f, tmp_path)
    entry = add_to_manifest(f, "unit test", tmp_path)
    assert read_manifest(tmp_path)["net.pt"]["sha256"] == entry["sha256"]
    assert verified_path("net.pt", tmp_path) == tmp_path / "net.pt"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    f.write_bytes(bytes(data))
    with pytest.raises(CytologiaInputError, match="sha256"):
        verified_path(f, tmp_path)
    f.write_bytes(bytes(data[:-10]))
    with pytest.raises(CytologiaInputError, match="size"):
        verified_path(f, tmp_path)
    with pytest.raises(CytologiaInputError, match="not found"):
        verified_path("absent.pt", tmp_path)


def test_broken_manifest_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CytologiaInputError, match="manifest"):
        read_manifest(tmp_path)


def test_repo_manifest_is_valid() -> None:
    files = read_manifest(Path(__file__).resolve().parents[1] / "models")
    assert all(len(e["sha256"]) == 64 for e in files.values())


def test_strict_load_names_every_mismatch() -> None:
    src = _net(3).state_dict()
    dst = _net(3)
    report = load_state_dict_checked(dst, src)
    assert report.ok and len(report.loaded) == 4
    assert torch.equal(dst.state_dict()["2.weight"], src["2.weight"])
    bad = dict(src)
    bad["extra.weight"] = torch.zeros(1)
    del bad["0.bias"]
    with pytest.raises(CytologiaInputError) as err:
        load_state_dict_checked(_net(3), bad, source="ckpt.pt")
    assert "ckpt.pt" in str(err.value) and "extra.weight" in str(err.value) and "0.bias" in str(err.value)
    with pytest.raises(CytologiaInputError, match=r"2.weight \(3, 5\) vs model \(7, 5\)"):
        load_state_dict_checked(_net(7), src)


def test_head_can_be_skipped_by_shape() -> None:
    src = _net(80).state_dict()  # e.g. an 80-class head, fine-tuned to 1 class
    dst = _net(1)
    before = dst.state_dict()["2.weight"].clone()
    report = load_state_dict_checked(dst, src, skip_mismatched=("2.",))
    assert sorted(report.skipped) == ["2.bias", "2.weight"]
    assert torch.equal(dst.state_dict()["2.weight"], before)
    assert torch.equal(dst.state_dict()["0.weight"], src["0.weight"])


def test_weights_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, f)
    assert main(["weights", "add", str(f), "--source", "test", "--models", str(tmp_path)]) == 0
    assert main(["weights", "check", "--models", str(tmp_path)]) == 0
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert main(["weights", "check", "--models", str(tmp_path)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text())["files"]["w.pt"]["source"] == "test"
