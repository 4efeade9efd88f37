"""Opacus's per-case gradients of our model and loss equal one backward pass per case (the clipping's input)."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from fedseg.common.nn.loss import DiceLoss
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.privacy.dpsgd import per_case_loss

CASES = 3


def _batch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three 32³ cases with random labels; the second does not annotate class 3."""
    gen = torch.Generator().manual_seed(7)
    image = torch.randn(CASES, 1, size, size, size, generator=gen)
    label = torch.randint(0, 5, (CASES, size, size, size), generator=gen)
    label[1][label[1] == 3] = 0  # the second case does not annotate class 3
    mask = torch.ones(CASES, 5, dtype=torch.bool)
    mask[1, 3] = False
    return image, label, mask


#: float32 throughout; the loss is the default one (Dice). With ce_weight = 1 the gradients are 25x larger and
#: float32's summation over 32³ voxels differs by 1.2e-5 at most (1e-4 of the largest gradient).
CASES_TO_CHECK = [
    ("attention-unet", "group"),
    ("unet", "group"),
    ("attention-unet", "instance"),
]


@pytest.mark.parametrize(("arch", "norm"), CASES_TO_CHECK)
def test_per_case_gradients_match_a_loop_of_single_case_passes(arch: str, norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, feature_scale=16, norm=norm))  # type: ignore[arg-type]
    loss_fn = DiceLoss()
    image, label, mask = _batch(32)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    per_case_loss(loss_fn, wrapped(image), label, mask).backward()  # type: ignore[no-untyped-call]
    samples = {name: p.grad_sample.detach().clone() for name, p in model.named_parameters()}
    wrapped.disable_hooks()
    for i in range(CASES):
        model.zero_grad()
        loss_fn(model(image[i : i + 1]), label[i : i + 1], mask[i : i + 1]).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None
            torch.testing.assert_close(samples[name][i], param.grad, atol=1e-5, rtol=0, msg=name)
    assert all(s.shape[0] == CASES for s in samples.values())
    assert not torch.allclose(samples["final.weight"][0], samples["final.weight"][1])  # three cases, not one copied
