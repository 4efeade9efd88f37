"""Meta-device model summary against the design doc's numbers, and the ``fed-eval summary`` command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.nn.model import ModelConfig
from fedseg.common.nn.summary import summarize

GIB = 2**30


@pytest.mark.parametrize(
    ("arch", "size", "gflops"),
    [
        ("attention-unet", (160, 160, 96), 346.65),
        ("unet", (160, 160, 96), 339.41),
        ("attention-unet", (96, 96, 64), 83.20),
        ("unet", (96, 96, 64), 81.46),
    ],
)
def test_forward_gflops_match_design_doc(arch: str, size: tuple[int, int, int], gflops: float) -> None:
    result = summarize(ModelConfig(arch=arch, n_classes=4), size)  # type: ignore[arg-type]
    assert result.gflops == pytest.approx(gflops, abs=0.006)


@pytest.mark.parametrize(("arch", "params", "gib"), [("attention-unet", 6_473_322, 2.772), ("unet", 5_888_004, 2.371)])
def test_params_and_activation_memory_match_design_doc(arch: str, params: int, gib: float) -> None:
    result = summarize(ModelConfig(arch=arch, n_classes=4), (160, 160, 96))  # type: ignore[arg-type]
    assert result.params == params
    assert result.param_state_bytes == 16 * params
    assert result.activation_bytes / GIB == pytest.approx(gib, abs=0.001)
    assert result.input_shape == (1, 1, 160, 160, 96)


def test_parts_add_up_and_run_in_forward_order() -> None:
    result = summarize(ModelConfig(n_classes=4), (32, 32, 32))
    names = [p.name for p in result.parts]
    assert names[:7] == ["conv1", "conv2", "conv3", "conv4", "center", "gating", "attentionblock4"]
    assert names[-1] == "final"
    assert sum(p.params for p in result.parts) == result.params
    assert sum(p.gflops for p in result.parts) == pytest.approx(result.gflops, rel=1e-9)


def test_batch_size_scales_flops_and_memory_linearly() -> None:
    cfg = ModelConfig(arch="unet", feature_scale=8)
    one = summarize(cfg, (32, 32, 16))
    three = summarize(cfg, (32, 32, 16), batch_size=3)
    assert three.gflops == pytest.approx(3 * one.gflops, rel=1e-9)
    # BatchNorm's saved per-channel mean/invstd do not grow with the batch; everything else does.
    assert 2.99 * one.activation_bytes < three.activation_bytes < 3 * one.activation_bytes
    assert three.params == one.params


@pytest.mark.parametrize("bad", [(100, 100, 100), (32, 32, 0)])
def test_summarize_rejects_sizes_not_divisible_by_16(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        summarize(ModelConfig(), bad)


def test_summarize_rejects_zero_batch() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        summarize(ModelConfig(), (32, 32, 32), batch_size=0)


def test_cli_json_prints_one_object_with_defaults() -> None:
    result = CliRunner().invoke(app, ["summary", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["arch"] == "attention-unet"
    assert data["input"] == [96, 160, 160]  # D,H,W = z,y,x like every size option
    assert (data["n_classes"], data["feature_scale"], data["batch_size"]) == (5, 4, 1)
    assert data["params"] == summarize(ModelConfig(), (96, 160, 160)).params
    assert data["gflops"] > 346.65  # five classes: slightly more head compute than the paper's four
    assert data["activation_bytes"] > 2.7 * GIB


def test_cli_json_follows_options() -> None:
    args = ["summary", "--json", "--arch", "unet", "--classes", "4", "--feature-scale", "4", "--input", "96,96,64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["arch"], data["input"], data["params"]) == ("unet", [96, 96, 64], 5_888_004)
    assert data["gflops"] == pytest.approx(81.46, abs=0.006)


def test_cli_table_shows_totals_and_blocks() -> None:
    result = CliRunner().invoke(app, ["summary", "--classes", "4", "--input", "32,32,32"])
    assert result.exit_code == 0, result.output
    assert "6,473,322" in result.stdout
    assert "attentionblock2" in result.stdout
    assert "GiB" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "100,100,100"], "--input: input spatial size (100, 100, 100) is not valid"),
        (["--input", "abc"], "--input must be three integers like 96,96,64, got 'abc'"),
        (["--input", "32,32"], "--input must be three positive integers"),
        (["--arch", "vnet"], "arch: Input should be 'attention-unet' or 'unet'"),
        (["--classes", "0"], "n_classes: Input should be greater than or equal to 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ],
)
def test_cli_bad_values_give_one_error_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["summary", *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert message in lines[0]
