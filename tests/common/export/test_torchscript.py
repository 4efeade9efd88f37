"""``fed-eval export --format torchscript``: a traced model that runs without fedseg and matches PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.engine.checkpoint import load_checkpoint
from fedseg.common.errors import IncompatibleModelError
from fedseg.common.export.torchscript import CONTRACT_ENTRY, trace, trace_difference

runner = CliRunner()

#: Runs in a fresh interpreter: loads the TorchScript file and the reference tensors, never imports fedseg.
NO_FEDSEG = """
import sys, torch
model = torch.jit.load(sys.argv[1])
x, expected = torch.load(sys.argv[2])
extra = {"fedseg.json": ""}
torch.jit.load(sys.argv[1], _extra_files=extra)
with torch.no_grad():
    got = model(x)
assert "fedseg" not in sys.modules and not any(m.startswith("fedseg.") for m in sys.modules), "fedseg was imported"
assert got.shape == expected.shape, (got.shape, expected.shape)
print(float((got - expected).abs().max()), len(extra["fedseg.json"]))
"""


@pytest.fixture(scope="module")
def exported_with_output(
    small_checkpoint: Path, ct_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ts") / "export"
    args = ["export", "--model", str(small_checkpoint), "--format", "torchscript", "--out", str(out)]
    result = runner.invoke(app, [*args, "--check", str(ct_file)])
    assert result.exit_code == 0, result.output
    return out, result.stdout


@pytest.fixture(scope="module")
def exported(exported_with_output: tuple[Path, str]) -> Path:
    return exported_with_output[0]


def test_the_traced_model_loads_and_runs_in_a_process_without_fedseg(
    exported: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    model, _ = load_checkpoint(small_checkpoint)
    x = torch.randn(2, 1, 16, 48, 32, generator=torch.Generator().manual_seed(1))  # not the traced 32^3 shape
    with torch.no_grad():
        torch.save((x, model(x)), tmp_path / "reference.pt")
    done = subprocess.run(
        [sys.executable, "-c", NO_FEDSEG, str(exported / "model.ts"), str(tmp_path / "reference.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repository: nothing of fedseg on the path by accident
    )
    assert done.returncode == 0, done.stderr
    difference, contract_chars = done.stdout.split()
    assert float(difference) < 1e-5
    assert int(contract_chars) > 100  # the contract travels inside the archive


def test_the_export_prints_and_records_its_parity_on_the_real_ct(exported: Path) -> None:
    terms = json.loads((exported / "model.json").read_text())
    assert terms["model_file"] == "model.ts"
    parity = terms["parity"]
    assert parity["prepared_shape"] == [15, 50, 61]
    assert parity["softmax_max_abs_diff"] <= 1e-4
    assert parity["argmax_agreement"] >= 0.9999
    assert sorted(p.name for p in exported.iterdir()) == ["MODEL_CARD.md", "model.json", "model.ts"]


def test_the_cli_table_shows_the_parity(exported_with_output: tuple[Path, str]) -> None:
    stdout = exported_with_output[1]
    assert "Parity: TorchScript vs PyTorch, sliding window over a 15x50x61 CT" in " ".join(stdout.split())
    assert "softmax max abs diff" in stdout and "argmax agreement" in stdout
    assert "100.0000 %" in stdout


class WidthBaked(nn.Module):
    """Scales by its input's width read as a Python number: tracing bakes in the traced width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.shape[-1])


def test_a_trace_that_does_not_generalise_is_refused(small_checkpoint: Path) -> None:
    model, _ = load_checkpoint(small_checkpoint)
    assert trace_difference(model, trace(model)) < 1e-5
    refused = r"^the traced model differs from the network by \d\.\d\de\+01 on another input shape"
    with pytest.raises(IncompatibleModelError, match=refused):
        trace(WidthBaked())


def test_the_archive_carries_the_contract(exported: Path) -> None:
    extra = {CONTRACT_ENTRY: ""}
    torch.jit.load(str(exported / "model.ts"), _extra_files=extra)
    inside = json.loads(extra[CONTRACT_ENTRY])
    assert inside["input"]["name"] == "image" and inside["output"]["name"] == "logits"
    assert inside["preprocessing"]["target_spacing_mm"] == {"z": 6.0, "y": 6.0, "x": 6.0}
