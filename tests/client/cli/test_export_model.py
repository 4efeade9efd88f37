"""``fed-client export-model``: a FedBN site's own model, the last global weights with the site's BatchNorm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from fedseg.client.app import train
from fedseg.client.cli.main import app as client_cli
from fedseg.client.localbn import LOCAL_BN_KEY, STATE_FILE
from fedseg.client.site import write_node_config
from fedseg.common.cli.main import app as eval_cli
from fedseg.common.engine.checkpoint import load_checkpoint
from fedseg.common.fl.batchnorm import batchnorm_keys
from fedseg.common.fl.packing import pack_arrays
from fedseg.common.fl.protocol import task_config
from fedseg.common.fl.weights import arrays_from_model, decode_arrays, encode_arrays
from fedseg.common.nn.model import build_model
from tests.client.test_app_handlers import TASK as HANDLER_TASK
from tests.client.test_app_handlers import TINY, _site, _train_message

runner = CliRunner()
LOCAL = HANDLER_TASK.model_copy(update={"bn": "local"})


def _global_model(seed: int) -> ArrayRecord:
    torch.manual_seed(seed)
    return arrays_from_model(build_model(TINY))


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return " ".join(output.split())


@pytest.fixture
def site_after_two_rounds(phantom_root: Path, tmp_path: Path) -> tuple[Path, Context, ArrayRecord]:
    """A FedBN site's workdir after round 1 (fp32) and round 2 (packed, fp16), and round 2's global weights."""
    site = _site(phantom_root, tmp_path / "work")
    site.workdir.mkdir()
    node_config = parse_config_args([str(write_node_config(site, tmp_path / "node.toml"))])
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    for server_round, task in ((1, LOCAL), (2, LOCAL.model_copy(update={"packed": True, "transport": "fp16"}))):
        received = _global_model(seed=server_round)
        config = task_config(task)
        config["server-round"] = server_round
        sent = encode_arrays(received, task.transport)
        reply = train(_train_message(pack_arrays(sent) if task.packed else sent, config), context)
        assert not reply.has_error()
    return site.workdir, context, decode_arrays(encode_arrays(received, "fp16"), "fp16")  # what the site got


def test_the_site_model_has_the_sites_batchnorm_and_the_last_global_weights(
    site_after_two_rounds: tuple[Path, Context, ArrayRecord], tmp_path: Path
) -> None:
    workdir, context, last_global = site_after_two_rounds
    assert (workdir / STATE_FILE).is_file()
    result = runner.invoke(client_cli, ["export-model", "--workdir", str(workdir), "--out", str(tmp_path / "site.pt")])
    assert result.exit_code == 0, result.output
    model, meta = load_checkpoint(tmp_path / "site.pt")
    weights = model.state_dict()
    own = context.state[LOCAL_BN_KEY]
    bn = batchnorm_keys(weights)
    assert set(own) == bn and len(bn) > 20
    for key in bn:  # the site's own tensors, exactly
        np.testing.assert_array_equal(weights[key].numpy(), own[key].numpy())
    means = [k for k in bn if k.endswith("running_mean")]
    assert all(not np.array_equal(own[k].numpy(), last_global[k].numpy()) for k in means)  # not the global ones
    for key in set(weights) - bn:  # everything else: round 2's global weights as received (fp16 on the wire)
        np.testing.assert_array_equal(weights[key].numpy(), last_global[key].numpy().astype(weights[key].numpy().dtype))
    assert (meta.round, meta.model, meta.patch_size) == (2, TINY, LOCAL.train.patch_size)
    assert "round" in result.stdout and "the site's own (BatchNorm)" in result.stdout
    card = (tmp_path / "site.MODEL_CARD.md").read_text().splitlines()  # the model card, beside the model
    for line in (
        f"- Parameters: {sum(p.numel() for p in model.parameters()):,}",
        "- Trained: federated, 2 rounds (the weights after global round 2)",
        "- Sites: unknown",
        "- BatchNorm: local",
        "- Differential privacy: off",
        "Central validation: not recorded.",
        "- Research use; not a medical device.",
    ):
        assert line in card, line


def test_fed_eval_predict_opens_the_site_model(
    site_after_two_rounds: tuple[Path, Context, ArrayRecord], phantom_root: Path, tmp_path: Path
) -> None:
    workdir, _, _ = site_after_two_rounds
    runner.invoke(client_cli, ["export-model", "--workdir", str(workdir), "--out", str(tmp_path / "site.pt")])
    image = next((phantom_root / "validation" / "imagesTr").iterdir())
    args = ["predict", "--model", str(tmp_path / "site.pt"), "--input", str(image), "--out", str(tmp_path / "pred")]
    result = runner.invoke(eval_cli, args)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 1


def test_a_pooled_batchnorm_round_keeps_nothing_on_disk(phantom_root: Path, tmp_path: Path) -> None:
    site = _site(phantom_root, tmp_path / "work")
    site.workdir.mkdir()
    node_config = parse_config_args([str(write_node_config(site, tmp_path / "node.toml"))])
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    assert not train(_train_message(_global_model(0), task_config(HANDLER_TASK)), context).has_error()
    assert not (site.workdir / STATE_FILE).exists()
    args = ["export-model", "--workdir", str(site.workdir), "--out", str(tmp_path / "s.pt")]
    result = runner.invoke(client_cli, args)
    assert result.exit_code == 1
    assert 'holds no fedbn-state.pt: this site has not finished a round with bn = "local"' in _one_line(result.output)


def test_bad_workdirs_and_outputs_are_one_line_errors(
    site_after_two_rounds: tuple[Path, Context, ArrayRecord], tmp_path: Path
) -> None:
    workdir, _, _ = site_after_two_rounds
    exists = tmp_path / "exists.pt"
    exists.write_text("mine")
    cases = [
        (["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a.pt")], "is not a folder"),
        (["--workdir", str(workdir), "--out", str(exists)], "already exists; pass a new file name"),
    ]
    (tmp_path / "c.MODEL_CARD.md").write_text("mine")
    cases.append((["--workdir", str(workdir), "--out", str(tmp_path / "c.pt")], "c.MODEL_CARD.md already exists"))
    for args, expected in cases:
        result = runner.invoke(client_cli, ["export-model", *args])
        assert result.exit_code == 1 and expected in _one_line(result.output)
    assert exists.read_text() == "mine" and not (tmp_path / "c.pt").exists()
    (workdir / STATE_FILE).write_bytes(b"torn")
    result = runner.invoke(client_cli, ["export-model", "--workdir", str(workdir), "--out", str(tmp_path / "b.pt")])
    assert result.exit_code == 1 and "fedbn-state.pt is not readable" in _one_line(result.output)
