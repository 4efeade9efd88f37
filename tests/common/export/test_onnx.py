"""``fed-eval export --format onnx``: a checked opset-18 graph with dynamic axes, its contract, its parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.engine.checkpoint import load_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(small_checkpoint: Path, ct_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "export"
    args = ["export", "--model", str(small_checkpoint), "--format", "onnx", "--out", str(out), "--check", str(ct_file)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Parity: onnxruntime (CPU) vs PyTorch" in " ".join(result.stdout.split())
    return out


def test_the_graph_is_checker_clean_opset_18_with_named_dynamic_axes(exported: Path) -> None:
    model = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (image,), (logits,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert (image.name, dims) == ("image", ["batch", 1, "16*d", "16*h", "16*w"])
    out_dims = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]
    assert (logits.name, out_dims) == ("logits", ["batch", 5, "16*d", "16*h", "16*w"])
    # no external data file
    assert sorted(p.name for p in exported.iterdir()) == ["MODEL_CARD.md", "model.json", "model.onnx"]


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 16), (3, 1, 48, 32, 80)])
def test_onnxruntime_matches_pytorch_at_other_batch_sizes_and_shapes(
    exported: Path, small_checkpoint: Path, shape: tuple[int, ...]
) -> None:
    model, _ = load_checkpoint(small_checkpoint)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_a_side_that_is_not_a_multiple_of_16_is_refused_by_the_graph(exported: Path) -> None:
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match=r"(?i)(dimension|shape|index)"):
        session.run(["logits"], {"image": np.zeros((1, 1, 16, 16, 24), np.float32)})


def test_the_contract_names_the_tensors_and_the_checkpoints_preprocessing(
    exported: Path, small_checkpoint: Path
) -> None:
    terms = json.loads((exported / "model.json").read_text())
    _, meta = load_checkpoint(small_checkpoint)
    assert (terms["input"]["name"], terms["output"]["name"], terms["opset"]) == ("image", "logits", 18)
    assert terms["input"]["spatial_multiple"] == 16
    assert terms["output"]["classes"] == {str(i): n for i, n in enumerate(meta.class_names)}
    pre = terms["preprocessing"]
    assert pre["orientation"] == meta.preprocess.orientation
    assert pre["target_spacing_mm"] == {"z": 6.0, "y": 6.0, "x": 6.0}
    assert pre["hu_window"] == list(meta.preprocess.hu_window)
    assert pre["normalization"] == "volume"
    assert terms["inference"]["window"] == list(meta.patch_size)
    assert terms["source"]["config_hash"] == meta.config_hash and terms["source"]["round"] == 3
    parity = terms["parity"]
    assert parity["runtime"] == "onnxruntime (CPU)"
    assert 0 < parity["softmax_max_abs_diff"] <= 1e-4  # float kernels differ a little, never by more
    assert parity["argmax_agreement"] >= 0.9999
