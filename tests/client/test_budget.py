"""The site's privacy budget (fedseg.client.budget): kept across restarts and resumes, refused at the right round,
never loosened by the server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.client.budget import BUDGET_FILE, PrivacyRefused, SiteBudget
from fedseg.client.policy import PrivacyPolicy, SitePolicy, site_policy
from fedseg.client.site import SiteConfig, site_from_node_config, write_node_config
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.errors import ConfigError
from fedseg.common.fl.protocol import TrainTask
from fedseg.common.nn.model import ModelConfig
from fedseg.common.privacy.accounting import epsilon, noise_for
from fedseg.common.privacy.config import PrivacyConfig

CASES = 8
STEPS = 5


def _task(run: str = "/runs/fed-1", **privacy: object) -> TrainTask:
    asked = PrivacyConfig.model_validate({"mode": "dp-sgd", **privacy}).for_run(10, run)
    train = TrainConfig(steps=STEPS, batch_size=2, patch_size=(16, 16, 16))
    model = ModelConfig(feature_scale=64, norm="group")
    return TrainTask(model=model, train=train, preprocess=PreprocessConfig(), deadline=600.0, privacy=asked)


def _round(budget: SiteBudget, task: TrainTask) -> float:
    """Plan a round and spend all its steps, as the site does around training."""
    return budget.spend(budget.plan(task, CASES), STEPS)


def test_epsilon_survives_a_site_restart(tmp_path: Path) -> None:
    first = SiteBudget.at(tmp_path, PrivacyPolicy())
    spent = [_round(first, _task()) for _ in range(2)]
    assert 0 < spent[0] < spent[1]
    restarted = SiteBudget.at(tmp_path, PrivacyPolicy())  # a new ClientApp process: only the file is left
    plan = restarted.plan(_task(), CASES)
    assert plan.before == pytest.approx(spent[1])
    assert plan.settings.sample_rate == 2 / CASES  # the accountant is told the true rate: batch / cases
    history = json.loads((tmp_path / BUDGET_FILE).read_text())["federations"][plan.key]
    assert history == [[1.0, 0.25, 2 * STEPS]]
    assert [p.name for p in tmp_path.iterdir()] == [BUDGET_FILE, BUDGET_FILE + ".lock"]  # no temporary file left


def test_a_resumed_run_counts_on_and_a_new_run_starts_its_own(tmp_path: Path) -> None:
    budget = SiteBudget.at(tmp_path, PrivacyPolicy())
    spent = _round(budget, _task("/runs/fed-1"))
    assert budget.plan(_task("/runs/fed-1"), CASES).before == pytest.approx(spent)  # --resume keeps output_dir
    assert budget.plan(_task("/runs/fed-2"), CASES).before == 0.0  # another federation


def test_a_site_key_stops_a_server_from_renaming_its_way_to_a_fresh_budget(tmp_path: Path) -> None:
    policy = PrivacyPolicy(federation="pancreas-study", max_epsilon=1e6)
    budget = SiteBudget.at(tmp_path, policy)
    spent = _round(budget, _task("/runs/fed-1"))
    renamed = _task("/runs/fed-2", federation="brand-new")  # the attack: a federation the site never saw
    assert renamed.privacy.federation != _task("/runs/fed-1").privacy.federation
    assert budget.plan(renamed, CASES).before == pytest.approx(spent)


def test_the_round_that_would_pass_max_epsilon_is_refused_before_training(tmp_path: Path) -> None:
    per_round = [epsilon([(1.0, 2 / CASES, STEPS * k)], 1e-5) for k in (1, 2, 3, 4)]
    budget = SiteBudget.at(tmp_path, PrivacyPolicy(max_epsilon=per_round[2]))  # exactly what 3 rounds spend
    for k in range(3):
        assert _round(budget, _task()) == pytest.approx(per_round[k])
    before = (tmp_path / BUDGET_FILE).read_bytes()
    with pytest.raises(PrivacyRefused) as refused:
        budget.plan(_task(), CASES)
    message = str(refused.value)
    assert message.startswith(f"privacy budget: this round would take the site's epsilon from {per_round[2]:.3f} to")
    assert f"{per_round[3]:.3f}" in message and "past its max_epsilon" in message and "\n" not in message
    assert (tmp_path / BUDGET_FILE).read_bytes() == before  # a refused round spends nothing


def test_the_server_cannot_lower_the_noise_or_raise_the_clip_norm(tmp_path: Path) -> None:
    policy = PrivacyPolicy(min_noise_multiplier=1.5, max_grad_norm=0.5, delta=1e-6)
    asked = _task(noise_multiplier=0.2, max_grad_norm=5.0, delta=1e-3)
    assert asked.privacy.noise_multiplier < policy.min_noise_multiplier  # the attack: less noise, a larger clip
    review = SitePolicy(privacy=policy).review(asked)
    assert review.notes == (
        "max_grad_norm 5 -> 0.5 (privacy.max_grad_norm)",
        "noise_multiplier 0.2 -> 1.5 (privacy.min_noise_multiplier)",
        "delta 0.001 -> 1e-06 (privacy.delta)",
    )
    plan = SiteBudget.at(tmp_path, policy).plan(review.task, CASES)
    assert (plan.settings.noise_multiplier, plan.settings.max_grad_norm, plan.delta) == (1.5, 0.5, 1e-6)
    unreviewed = SiteBudget.at(tmp_path, policy).plan(asked, CASES)  # the budget clamps even without review
    assert (unreviewed.settings.noise_multiplier, unreviewed.settings.max_grad_norm) == (1.5, 0.5)
    assert len(unreviewed.notes) == 3


def test_an_epsilon_target_cannot_buy_less_noise_than_the_site_allows(tmp_path: Path) -> None:
    asked = _task(epsilon=1000.0)
    implied = noise_for(1000.0, 1e-5, 2 / CASES, 10 * STEPS)
    assert implied < 0.8  # the attack: a huge target means almost no noise
    plan = SiteBudget.at(tmp_path, PrivacyPolicy(min_noise_multiplier=0.8)).plan(asked, CASES)
    assert plan.settings.noise_multiplier == 0.8
    assert plan.notes == (f"noise_multiplier {implied:.4g} (for epsilon 1000) -> 0.8 (privacy.min_noise_multiplier)",)
    honest = SiteBudget.at(tmp_path, PrivacyPolicy()).plan(_task(epsilon=8.0), CASES)
    assert honest.settings.noise_multiplier == pytest.approx(noise_for(8.0, 1e-5, 2 / CASES, 10 * STEPS))
    assert epsilon([(honest.settings.noise_multiplier, 2 / CASES, 10 * STEPS)], 1e-5) <= 8.0  # over the 10 rounds


def test_require_dp_refuses_a_task_without_dp() -> None:
    policy = SitePolicy(privacy=PrivacyPolicy(require_dp=True))
    plain = _task().model_copy(update={"privacy": PrivacyConfig()})
    refusal = policy.review(plain).refusal
    assert refusal is not None and "require_dp" in refusal and "privacy.mode=dp-sgd" in refusal
    assert policy.review(_task()).refusal is None
    assert policy.review(plain, evaluate=True).refusal is None  # scoring the global model trains nothing


def test_an_unreadable_budget_refuses_and_is_never_started_afresh(tmp_path: Path) -> None:
    (tmp_path / BUDGET_FILE).write_text("{ half a file")
    with pytest.raises(PrivacyRefused, match="cannot be read"):
        SiteBudget.at(tmp_path, PrivacyPolicy()).plan(_task(), CASES)
    assert (tmp_path / BUDGET_FILE).read_text() == "{ half a file"


def test_the_privacy_table_reaches_the_clientapp_through_the_node_config(tmp_path: Path) -> None:
    table = "[privacy]\nrequire_dp = true\nmax_epsilon = 8.0\nmin_noise_multiplier = 1.1\nfederation = 'study'\n"
    (tmp_path / "policy.toml").write_text("max_steps = 5\n" + table)
    policy = site_policy(tmp_path, None, {})
    site = SiteConfig(site="a", data=tmp_path, workdir=tmp_path, **policy.caps())
    read = site_from_node_config(_node_config(write_node_config(site, tmp_path / "node.toml")))
    assert (
        read.policy.privacy
        == policy.privacy
        == PrivacyPolicy(require_dp=True, max_epsilon=8.0, min_noise_multiplier=1.1, federation="study")
    )
    (tmp_path / "policy.toml").write_text("[privacy]\nmax_epsilom = 8\n")
    with pytest.raises(ConfigError, match=r"policy.toml: privacy.max_epsilom: Extra inputs are not permitted$"):
        site_policy(tmp_path, None, {})


def _node_config(path: Path) -> dict[str, object]:
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([str(path)]))
