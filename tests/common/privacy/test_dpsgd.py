"""Patient-level DP-SGD (fedseg.common.privacy.dpsgd): it learns, one patch per sampled case, noise no one replays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.data.sampling import PatchSampler
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.train import train_model
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.privacy import dpsgd
from fedseg.common.privacy.dpsgd import DPSettings, train_private, unsupported
from fedseg.common.privacy.sampling import PoissonCases
from tests.common.engine.test_training import make_case

GROUP = ModelConfig(feature_scale=16, norm="group")


@pytest.fixture(scope="module")
def cases() -> list[PreparedCase]:
    return [make_case(seed) for seed in range(4)]


def _config(steps: int, **update: object) -> TrainConfig:
    base = {"steps": steps, "patch_size": (32, 32, 32), "batch_size": 2, "lr": 3e-3, "augment": False}
    return TrainConfig.model_validate({**base, "foreground_prob": 0.5, "cpu_bf16": False, **update})


def _model(cfg: ModelConfig = GROUP) -> nn.Module:
    torch.manual_seed(0)
    return build_model(cfg)


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dp_sgd_lowers_the_loss_with_finite_weights(cases: list[PreparedCase]) -> None:
    model = _model()
    report = train_private(model, cases, _config(12), DPSettings(0.3, 1.0, 0.5), "cpu", rng=np.random.default_rng(0))
    assert report.steps == 12 and report.skipped_steps == 0
    losses = [x for x in report.loss_history if np.isfinite(x)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02
    assert bool(torch.isfinite(_weights(model)).all())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus's traces are gone


def test_every_step_takes_one_patch_of_each_poisson_sampled_case(
    cases: list[PreparedCase], monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[list[int]] = []
    patched: list[int] = []
    real_draw, real_patch = PoissonCases.draw, PatchSampler.sample_patch

    def draw(self: PoissonCases) -> list[int]:
        assert self.rate == 0.25 and self.cases == 4  # the rate the accountant is told
        drawn.append(real_draw(self))
        return drawn[-1]

    def patch(self: PatchSampler, index: int) -> tuple[np.ndarray, np.ndarray]:
        patched.append(index)
        return real_patch(self, index)

    monkeypatch.setattr(PoissonCases, "draw", draw)
    monkeypatch.setattr(PatchSampler, "sample_patch", patch)
    report = train_private(_model(), cases, _config(6, batch_size=1), DPSettings(1.0, 1.0, 0.25), "cpu")
    assert patched == [i for step in drawn for i in step]
    assert report.samples == len(patched) and len(drawn) == report.steps == 6


def test_poisson_draws_include_each_case_at_the_rate() -> None:
    draws = PoissonCases(10, 0.3, np.random.default_rng(0))
    counts = np.zeros(10)
    sizes = []
    for _ in range(4000):
        chosen = draws.draw()
        counts[chosen] += 1
        sizes.append(len(chosen))
    assert np.allclose(counts / 4000, 0.3, atol=0.03)  # every case alike, independently of the others
    assert 0 in sizes and max(sizes) >= 7  # the batch size varies, down to an empty step
    with pytest.raises(ValueError, match="rate in"):
        PoissonCases(10, 1.5)


def test_the_server_cannot_replay_the_noise(cases: list[PreparedCase]) -> None:
    # attack: a server knows the task's seed and the global weights; were the noise drawn from that seed, it could
    # compute it and subtract it. Non-DP training with the same seed repeats exactly; DP-SGD does not.
    cfg = _config(1)
    plain = [_model() for _ in range(2)]
    for model in plain:
        train_model(model, cases, cfg, "cpu", progress=False)
    assert torch.equal(_weights(plain[0]), _weights(plain[1]))
    private = [_model() for _ in range(2)]
    for model in private:
        train_private(model, cases, cfg, DPSettings(1.0, 1.0, 0.5), "cpu", rng=np.random.default_rng(3))
    assert not torch.allclose(_weights(private[0]), _weights(private[1]))


def test_a_step_that_samples_no_case_is_noise_alone(cases: list[PreparedCase]) -> None:
    model = _model()
    before = _weights(model)
    never = np.random.default_rng(0)
    report = train_private(model, cases, _config(1), DPSettings(1.0, 1.0, 1e-9), "cpu", rng=never)
    assert report.samples == 0 and report.steps == 1 and report.skipped_steps == 0
    assert not torch.equal(_weights(model), before)  # the noise moved it: an empty step is not skipped


def test_the_clip_bounds_what_one_case_can_move(cases: list[PreparedCase], monkeypatch: pytest.MonkeyPatch) -> None:
    # with no noise and SGD, one step's update is lr x (clipped gradient) / expected batch: its norm <= lr x C
    monkeypatch.setattr(dpsgd, "make_optimizer", lambda m, cfg: torch.optim.SGD(m.parameters(), lr=cfg.lr))
    monkeypatch.setattr(dpsgd, "_dp_optimizer", _noiseless(dpsgd._dp_optimizer))
    model = _model()
    before = _weights(model)
    train_private(model, cases[:1], _config(1, lr=1.0), DPSettings(1.0, 1e-3, 1.0), "cpu")
    moved = float((_weights(model) - before).norm())
    assert 1e-4 < moved <= 1e-3 * (1 + 1e-4)


def _noiseless(build: object) -> object:
    def make(*args: object, **kwargs: object) -> object:
        optimizer = build(*args, **kwargs)  # type: ignore[operator]
        optimizer.noise_multiplier = 0.0
        return optimizer

    return make


def test_what_dp_sgd_cannot_train_is_said_in_one_line() -> None:
    assert "model.norm=group" in (unsupported(_model(ModelConfig(feature_scale=16)), _config(1)) or "")
    assert "pseudo_weight" in (unsupported(_model(), _config(1, pseudo_weight=0.5)) or "")
    assert unsupported(_model(), _config(1)) is None
    with pytest.raises(ValueError, match=r"^DP-SGD cannot train model.norm = batch"):
        train_private(_model(ModelConfig(feature_scale=16)), [], _config(1), DPSettings(1.0, 1.0, 0.5), "cpu")
