"""model.norm: BatchNorm (the paper, unchanged) or a per-case GroupNorm / InstanceNorm that DP-SGD can train."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fedseg.common.nn.blocks import MAX_GROUPS, group_count
from fedseg.common.nn.model import ModelConfig, build_model, count_parameters


def _norms(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)
    return [m for m in model.modules() if isinstance(m, kinds)]


def test_group_count_divides_every_channel_count() -> None:
    for channels in range(1, 1025):
        groups = group_count(channels)
        assert 1 <= groups <= MAX_GROUPS and channels % groups == 0
        assert groups == 1 or channels // groups >= 2
    assert [group_count(c) for c in (1, 2, 4, 16, 21, 85, 341, 1024)] == [1, 1, 2, 8, 7, 5, 1, 8]


@pytest.mark.parametrize("scale", [1, 3, 16, 64])
def test_a_group_norm_model_builds_and_runs_at_every_feature_scale(scale: int) -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(feature_scale=scale, norm="group"))
    norms = _norms(model)
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups >= 1 for m in norms)
    if scale == 64:  # one channel at the first level: one group of one channel
        model = build_model(ModelConfig(feature_scale=scale, norm="group"))
        assert model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 5, 16, 16, 16)


@pytest.mark.parametrize("arch", ["attention-unet", "unet"])
def test_per_case_norms_keep_the_parameter_count_and_hold_no_buffers(arch: str) -> None:
    counts = {}
    for norm in ("batch", "group", "instance"):
        with torch.device("meta"):
            model = build_model(ModelConfig(arch=arch, n_classes=4, norm=norm))  # type: ignore[arg-type]
        counts[norm] = count_parameters(model)
        assert (list(model.buffers()) == []) == (norm != "batch")
    assert len(set(counts.values())) == 1
    if arch == "attention-unet":
        assert counts["batch"] == 6_473_322  # the paper's network at feature scale 4


def test_batch_is_the_default_and_an_unknown_norm_is_refused() -> None:
    assert ModelConfig().norm == "batch"
    with pytest.raises(ValidationError, match="norm"):
        ModelConfig(norm="layer")  # type: ignore[arg-type]


def test_activations_are_in_place_only_after_batchnorm() -> None:
    def inplace(norm: str) -> set[bool]:
        with torch.device("meta"):
            model = build_model(ModelConfig(norm=norm))  # type: ignore[arg-type]
        return {m.inplace for m in model.modules() if isinstance(m, nn.ReLU)}

    assert inplace("batch") == {True}
    assert inplace("group") == inplace("instance") == {False}


def test_out_of_place_relus_give_the_batchnorm_model_the_same_numbers() -> None:
    # what lets the per-case norms run their ReLUs out of place: the values and gradients are bit for bit the same
    runs = []
    for inplace in (True, False):
        torch.manual_seed(0)
        model = build_model(ModelConfig(feature_scale=16))
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = inplace
        out = model(torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)))
        out.square().mean().backward()
        runs.append((out.detach(), [p.grad for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    assert all(a is not None and b is not None and torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_group_norm_gets_batchnorm_initialisation() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_scale=16, norm="group"))
    weights = torch.cat([m.weight.detach() for m in _norms(model)])
    biases = torch.cat([m.bias.detach() for m in _norms(model)])
    assert 0.9 < float(weights.mean()) < 1.1 and 0.005 < float(weights.std()) < 0.05
    assert float(biases.abs().max()) == 0.0
