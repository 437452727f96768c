"""``mesh models add`` and ``mesh variants list``: what a user types and sees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from mesh.cli import cli
from mesh.variants.digits import export_onnx, load_split


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained linear digits classifier as ONNX, the same with a +1000 logit offset, and data."""
    root = tmp_path_factory.mktemp("cli")
    x_tr, y_tr, x_val, y_val = load_split()
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x_tr)), torch.from_numpy(y_tr)).backward()
        optimiser.step()
    offset = nn.Linear(10, 10)
    with torch.no_grad():  # scores 1e-3 apart on top of 1000: int8 cannot tell them apart
        offset.weight.copy_(torch.eye(10) * 1e-3)
        offset.bias.fill_(1000.0)
    (root / "linear.onnx").write_bytes(export_onnx(model.eval()))
    (root / "offset.onnx").write_bytes(export_onnx(nn.Sequential(model, offset).eval()))
    np.savez(root / "val.npz", x=x_val, y=y_val)
    np.savez(root / "bad.npz", images=x_val)
    return {p.stem: p for p in root.iterdir()}


def _mesh(home: Path, *args: str) -> tuple[int, str]:
    """Exit code and what the user sees (stdout and stderr interleaved)."""
    result = CliRunner().invoke(cli, ["--home", str(home), *map(str, args)])
    return result.exit_code, result.output


def _json(home: Path, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["--home", str(home), *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_models_add_registers_measured_variants(tmp_path: Path, files: dict[str, Path]) -> None:
    code, out = _mesh(tmp_path, "models", "add", "lin", "--task", "digits-lin", "--model",
                      files["linear"], "--validation", files["val"],
                      "--formats", "onnx-fp32,onnx-int8")
    assert code == 0, out
    assert "lin-onnx-fp32" in out and "lin-onnx-int8" in out and "top-1" in out
    # Progress bars on stderr: conversion, calibration of the int8 variant, profiling.
    assert "convert lin" in out and "calibrate lin" in out and "profile" in out
    listed = _json(tmp_path, "variants", "list", "--task", "digits-lin")
    assert [v["name"] for v in listed["variants"]] == ["lin-onnx-fp32", "lin-onnx-int8"]
    assert listed["rejected"] == []
    for variant in listed["variants"]:
        assert 0.85 < variant["accuracy"] <= 1.0
        assert set(variant["profiles"]) == {"cpu-1t", "cpu-2t"}
        assert variant["profiles"]["cpu-1t"]["peak_memory_bytes"] > 0


def test_a_rejected_variant_is_shown_with_its_reason(tmp_path: Path, files: dict[str, Path]) -> None:
    code, out = _mesh(tmp_path, "models", "add", "off", "--task", "t", "--model", files["offset"],
                      "--validation", files["val"], "--formats", "onnx-fp32,onnx-int8")
    assert code == 0, out
    assert "rejected" in out and "off-onnx-int8" in out and "top1_agreement" in out
    code, out = _mesh(tmp_path, "variants", "list")
    assert code == 0 and "rejected variants (never routed to)" in out
    listed = _json(tmp_path, "variants", "list")
    assert [v["name"] for v in listed["variants"]] == ["off-onnx-fp32"]
    assert [(r["name"], r["stage"]) for r in listed["rejected"]] == [("off-onnx-int8", "agreement")]


def test_bad_input_is_one_clear_error(tmp_path: Path, files: dict[str, Path]) -> None:
    code, out = _mesh(tmp_path, "models", "add", "lin", "--task", "t", "--model", files["linear"],
                      "--validation", files["bad"])
    assert code == 1
    assert "Error: validation set" in out and "unknown key(s) ['images']" in out
    assert "Traceback" not in out
    code, out = _mesh(tmp_path, "models", "add", "lin", "--task", "t", "--model",
                      tmp_path / "missing.onnx", "--validation", files["val"])
    assert code == 1 and "does not exist" in out


def test_a_tenant_adds_a_private_head_on_a_shared_base(heads_home: Path, tmp_path: Path) -> None:
    import shutil

    from mesh.registry import Registry
    from mesh.variants.topics import topic_head

    home = tmp_path / "home"
    shutil.copytree(heads_home, home)
    head, validation = topic_head(home, ["weather", "cooking"])
    (tmp_path / "head.onnx").write_bytes(head)
    ids, mask = validation.inputs
    np.savez(tmp_path / "val.npz", x0=ids, x1=mask, y=validation.labels)
    code, out = _mesh(home, "models", "add", "mine", "--task", "mine-topics", "--base", "minilm",
                      "--head", tmp_path / "head.onnx", "--validation", tmp_path / "val.npz",
                      "--tenant", "acme")
    assert code == 0, out
    assert "mine-onnx-fp32" in out and "mine-onnx-int8-dynamic" in out
    heads = [v for v in Registry.load(home).variants.values() if v.family == "mine"]
    assert {(v.base, v.tenant, v.task) for v in heads} == {
        ("minilm-onnx-fp32", "acme", "mine-topics"),
        ("minilm-onnx-int8-dynamic", "acme", "mine-topics")}
    assert all(v.accuracy >= 0.9 for v in heads)  # two topics, end to end
    # a base with heads on it cannot be removed; the heads can, and then are gone
    code, out = _mesh(home, "models", "remove", "minilm")
    assert code == 1 and "is the base of private heads (acme-topics, globex-topics, mine)" in out
    code, out = _mesh(home, "models", "remove", "mine")
    assert code == 0 and "mine-onnx-fp32" in out
    assert "mine" not in {v.family for v in Registry.load(home).variants.values()}
    code, out = _mesh(home, "models", "remove", "mine")
    assert code == 1 and "model 'mine' is not registered" in out and "Traceback" not in out

    for args, said in (
            (["--head", tmp_path / "head.onnx"], "--base and --head go together"),
            (["--model", tmp_path / "head.onnx", "--base", "minilm", "--head",
              tmp_path / "head.onnx"], "give --model (a whole model) or --base with --head"),
            (["--base", "nope", "--head", tmp_path / "head.onnx"], "base 'nope'")):
        code, out = _mesh(home, "models", "add", "other", "--task", "other",
                          "--validation", tmp_path / "val.npz", *args)
        assert code != 0 and said in out and "Traceback" not in out, out


def test_removing_a_model_from_a_mesh_that_is_not_there_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "mesh.key").write_text("ab" * 32)
    code, out = _mesh(tmp_path, "models", "remove", "mine", "--mesh", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach http://127.0.0.1:9" in out and "Traceback" not in out
    code, out = _mesh(tmp_path / "empty", "models", "remove", "mine", "--mesh",
                      "http://127.0.0.1:9")
    assert code == 1 and "no mesh key at" in out and "Traceback" not in out
