"""``MODEL_CARD.md``: the pure renderer on hand-made facts (exact lines), and the cards the exports write."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from typer.testing import CliRunner

from fedseg.client.app import evaluate
from fedseg.common.cli.main import app
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.checkpoint import load_checkpoint
from fedseg.common.export.modelcard import (
    CARD_FILE,
    CardFacts,
    Federation,
    OrganScore,
    checkpoint_facts,
    parameter_count,
    render,
)
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.configfile import load_server_config
from fedseg.server.control.runs import new_spec, save_config
from fedseg.server.run.loop import serve
from tests.server.run.test_rounds import SiteGrid, _config_overrides, _grid

runner = CliRunner()

FACTS = CardFacts(
    source="best.pt",
    arch="attention-unet",
    feature_scale=16,
    norm="batch",
    parameters=1234567,
    class_names=("background", "pancreas", "liver"),
    preprocess=PreprocessConfig(target_spacing=(3.0, 1.5, 1.0)),
    patch_size=(32, 64, 96),
    fedseg_version="9.9.9",
    config_hash="abcdef0123456789",
    round=12,
    federation=Federation(
        sites=3, cases=(4, 9, 20), strategy="fedprox", bn="pooled", dp_mode="dp-sgd", epsilons=(2.5, 3.25), delta=1e-5
    ),
    central=(OrganScore("pancreas", 0.41234, None), OrganScore("liver", 0.9, 2)),
    central_round=12,
    cross_site={1: (OrganScore("liver", 0.8, 5, 0.05),), 2: (OrganScore("pancreas", float("nan"), 0),)},
    cross_site_round=12,
)


def test_the_card_says_model_federation_scores_preprocessing_and_use_in_exact_lines() -> None:
    lines = render(FACTS).splitlines()
    expected = [
        "# Model card",
        "Exported from `best.pt` by fedseg 9.9.9 (config hash abcdef0123456789).",
        "- Architecture: attention-unet, feature scale 16, batch normalisation",
        "- Parameters: 1,234,567",
        "- Classes: 0 = background, 1 = pancreas, 2 = liver",
        "- Trained: federated, 12 rounds (the weights after global round 12)",
        "- Sites: 3",
        "- Training cases per site (sorted, sites not named): 4, 9, 20",
        "- Strategy: fedprox",
        "- BatchNorm: pooled",
        "- Differential privacy: dp-sgd",
        "- ε per site (sorted, at δ = 1e-05): 2.5, 3.25",
        "Central validation (round 12):",
        "| organ | Dice | n |",
        "| pancreas | 0.412 | unknown |",
        "| liver | 0.900 | 2 |",
        "| site | liver | pancreas |",
        "| 1 | 0.800 ± 0.050 (n 5) | not annotated |",
        "| 2 | not annotated | n/a (n 0) |",
        "- Orientation: LPS",
        "- Spacing: 1 x 1.5 x 3 mm (x, y, z), linear interpolation",
        "- HU window: [-200, 300], then z-score over volume",
        "- Patch (sliding window): 32 x 64 x 96 (z, y, x), overlap 0.5",
        "- Research use; not a medical device.",
    ]
    for line in expected:
        assert line in lines, line
    assert lines.index("## Training") < lines.index("## Evaluation") < lines.index("## Intended use and limitations")


def test_a_checkpoint_without_its_run_folder_says_what_is_unknown() -> None:
    facts = CardFacts(**{**FACTS.__dict__, "federation": None, "central": (), "cross_site": {}})
    lines = render(facts).splitlines()
    assert "- Federation: unknown (the checkpoint was exported without its run folder)" in lines
    assert "Central validation: not recorded." in lines and "Cross-site validation: not recorded." in lines
    assert not any(line.startswith("- Sites:") for line in lines)


def test_unrecorded_federation_facts_are_unknown_and_no_dp_has_no_epsilon_line() -> None:
    facts = CardFacts(**{**FACTS.__dict__, "federation": Federation(bn="local", dp_mode="off")})
    lines = render(facts).splitlines()
    for line in ("- Sites: unknown", "- Training cases per site (sorted, sites not named): unknown",
                 "- Strategy: unknown", "- BatchNorm: local", "- Differential privacy: off"):  # fmt: skip
        assert line in lines, line
    assert not any(line.startswith("- ε") for line in lines)
    dp = CardFacts(**{**FACTS.__dict__, "federation": Federation(dp_mode="client-dp")})
    assert "- ε per site (sorted, at δ = unknown): not recorded" in render(dp).splitlines()


def test_a_centrally_trained_checkpoint_has_no_federation() -> None:
    facts = CardFacts(**{**FACTS.__dict__, "round": None, "epoch": 7, "federation": None})
    lines = render(facts).splitlines()
    assert "- Trained: centrally with fed-eval train, 7 epochs (no federation)" in lines
    assert not any("Federation" in line or line.startswith("- Sites") for line in lines)


def test_an_export_of_a_bare_checkpoint_writes_a_card_with_its_unknowns(small_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "ts"
    result = runner.invoke(
        app, ["export", "--model", str(small_checkpoint), "--format", "torchscript", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    model, _ = load_checkpoint(small_checkpoint)
    lines = (out / CARD_FILE).read_text().splitlines()
    assert f"- Parameters: {parameter_count(model):,}" in lines
    assert "- Trained: federated, 3 rounds (the weights after global round 3)" in lines
    assert "- Federation: unknown (the checkpoint was exported without its run folder)" in lines


class CrossSiteGrid(SiteGrid):
    """The round-loop test's grid, answering evaluate (cross-site) messages with the ClientApp's evaluate handler."""

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = super().push_messages([m for m in messages if m.metadata.message_type == MessageType.TRAIN])
        for message in (m for m in messages if m.metadata.message_type == MessageType.EVALUATE):
            node = message.metadata.dst_node_id
            message_id = f"e{len(self.replies)}-{node}"
            message.metadata.__dict__["_message_id"] = message_id
            node_config = {k: str(v) for k, v in self.sites[node].model_dump().items() if v is not None}
            context = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={})
            reply = evaluate(message, context)
            reply.metadata.__dict__["_src_node_id"] = node
            self.replies[message_id] = reply
            ids.append(message_id)
        return ids


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-round federation (two phantom sites, fs 64, 16³) with cross-site validation after the last round."""
    from flwr.supercore.task_identity import TaskIdentity

    tmp = tmp_path_factory.mktemp("trained-run")
    phantoms = tmp / "data"
    generate_phantoms(phantoms, sites=2, cases_per_site=2, val_cases=1, size=(16, 16, 16))
    out = tmp / "run"
    cfg = load_server_config(None, [*_config_overrides(phantoms, out), "cross_site_every=0"])
    save_config(cfg)
    grid = CrossSiteGrid(_grid(phantoms, tmp).sites)
    with pytest.MonkeyPatch.context() as patch:  # as if inside a ServerApp process (tests/server/conftest.py)
        for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            patch.setattr(TaskIdentity, name, value)
        serve(grid, new_spec(cfg))  # type: ignore[arg-type]
    return out


def test_the_card_of_a_trained_run_has_its_parameters_rounds_sites_and_scores(trained_run: Path) -> None:
    checkpoint = trained_run / "checkpoints" / "last.pt"
    model, meta = load_checkpoint(checkpoint)
    facts = checkpoint_facts(model, meta, checkpoint)
    assert facts.parameters == sum(p.numel() for p in model.parameters()) > 0
    assert (facts.round, facts.federation) == (2, Federation(2, (2, 2), "fedavg", "pooled", "off", (), 1e-5))
    assert {s.organ for s in facts.central} == {"pancreas", "spleen", "kidney", "liver"}
    assert set(facts.cross_site) == {1, 2} and facts.cross_site_round == 2
    assert all(s.n == 2 for scores in facts.cross_site.values() for s in scores if s.n)  # each site's 2 cases
    out = trained_run.parent / "export"
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(out)])
    assert result.exit_code == 0, result.output
    card = (out / CARD_FILE).read_text()
    lines = card.splitlines()
    assert f"- Parameters: {parameter_count(model):,}" in lines
    assert "- Trained: federated, 2 rounds (the weights after global round 2)" in lines
    assert "- Sites: 2" in lines and "- Training cases per site (sorted, sites not named): 2, 2" in lines
    assert "site-1" not in card and "site-2" not in card  # sites are numbered, never named


def test_the_run_folder_gives_sites_cases_and_epsilon_up_to_the_checkpoints_round(tmp_path: Path) -> None:
    from fedseg.server.run.history import History, RoundRow, SiteRound
    from tests.common.export.conftest import write_checkpoint

    run = tmp_path / "run"
    checkpoint = write_checkpoint(run / "checkpoints" / "best.pt", PreprocessConfig())  # round 3
    (run / "config.json").write_text(
        json.dumps({"strategy": {"name": "median", "bn": "pooled"}, "privacy": {"mode": "dp-sgd", "delta": 1e-6}})
    )
    history = History(run)

    def site(name: str, cases: int, eps: float) -> SiteRound:
        return SiteRound(site=name, cases=cases, loss=1, samples=1, seconds=1, epsilon=eps, delta=1e-6)

    history.append(RoundRow(round=0, seconds=1))
    history.append(RoundRow(round=1, seconds=1, sites=[site("b", 5, 0.5), site("a", 7, 0.4)]))
    history.append(RoundRow(round=3, seconds=1, sites=[site("b", 6, 1.5)], dice={"dice_liver": 0.5}))
    history.append(RoundRow(round=4, seconds=1, sites=[site("c", 99, 9.0)]))  # after the checkpoint: not its history
    model, meta = load_checkpoint(checkpoint)
    facts = checkpoint_facts(model, meta, checkpoint)
    assert facts.federation == Federation(2, (6, 7), "median", "pooled", "dp-sgd", (0.4, 1.5), 1e-6)
    lines = render(facts).splitlines()
    assert "- ε per site (sorted, at δ = 1e-06): 0.4, 1.5" in lines
    assert "- Training cases per site (sorted, sites not named): 6, 7" in lines
