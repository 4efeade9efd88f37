"""Training on a partially labelled site: the optimiser must not shrink the head rows of unannotated classes."""

from __future__ import annotations

import pytest
import torch

from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.train import make_optimizer, train_model
from fedseg.common.nn.model import ModelConfig, build_model
from tests.common.engine.test_training import make_case

UNANNOTATED = (1, 3)  # make_case() annotates spleen (2) and liver (4) only


@pytest.fixture(scope="module")
def case() -> PreparedCase:
    return make_case()


def _head_drift(case: PreparedCase, coupled: bool) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_scale=16))
    cfg = TrainConfig(
        steps=10, patch_size=(32, 32, 32), lr=3e-3, augment=False, partial_loss="exclusion", weight_decay=1e-6
    )
    rows = list(UNANNOTATED)
    before = model.final.weight.detach()[rows].clone(), model.final.bias.detach()[rows].clone()
    optimizer = (
        torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if coupled
        else make_optimizer(model, cfg)
    )
    train_model(model, [case], cfg, "cpu", progress=False, optimizer=optimizer)
    after = model.final.weight.detach()[rows], model.final.bias.detach()[rows]
    return max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))


def test_adamw_leaves_unannotated_head_rows_in_place(case: PreparedCase) -> None:
    assert isinstance(make_optimizer(build_model(ModelConfig(feature_scale=16)), TrainConfig()), torch.optim.AdamW)
    # Under exclusion the final conv's rows of unannotated classes get exactly zero gradient: only decay moves them.
    assert _head_drift(case, coupled=False) < 1e-7
    # Coupled L2 inside Adam is normalised into a step of ~lr per step: 10 steps x 3e-3 ~ 0.03.
    assert _head_drift(case, coupled=True) > 1e-2


def _trained(case: PreparedCase, pseudo_weight: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_scale=16))
    cfg = TrainConfig(
        steps=2, patch_size=(32, 32, 32), lr=3e-3, augment=False, pseudo_weight=pseudo_weight, cpu_bf16=False
    )
    train_model(model, [case], cfg, "cpu", progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pseudo_labels_change_training_only_where_a_site_leaves_classes_unannotated(case: PreparedCase) -> None:
    plain, pseudo = _trained(case, 0.0), _trained(case, 1.0)
    assert any(not torch.equal(plain[k], pseudo[k]) for k in plain)  # the teacher's targets moved the weights
    full = PreparedCase(**{**vars(case), "annotated": (True,) * len(case.annotated)})
    plain_full, pseudo_full = _trained(full, 0.0), _trained(full, 1.0)
    assert all(torch.equal(plain_full[k], pseudo_full[k]) for k in plain_full)  # nothing to pseudo-label
