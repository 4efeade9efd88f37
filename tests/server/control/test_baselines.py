"""The demo's "each site alone" comparison: training from the federation's initial weights, scored centrally."""

from __future__ import annotations

import math
from pathlib import Path

from fedseg.common.engine.config import TrainConfig
from fedseg.server.config import ServerConfig
from fedseg.server.control.baselines import comparison_lines, site_alone, steps_per_site
from fedseg.server.control.demo import DemoOptions, demo_config, ensure_phantoms

ORGANS = ("pancreas", "spleen", "kidney", "liver")


def _dice(values: tuple[float, float, float, float]) -> dict[str, float]:
    out = {f"dice_{o}": v for o, v in zip(ORGANS, values, strict=True)}
    out["dice_mean"] = sum(values) / 4
    return out


def test_comparison_lines_put_federated_beside_each_site_and_give_the_margin() -> None:
    federated: dict[str, float | None] = dict(_dice((0.5, 0.6, 0.7, 0.8)))  # mean 0.65
    alone = {"site-1": _dice((0.4, 0.6, 0.6, 0.8)), "site-2": _dice((0.2, 0.3, 0.4, 0.5))}  # 0.60, 0.35
    lines = comparison_lines(federated, alone)
    assert [line.split()[0] for line in lines[:4]] == ["model", "federated", "site-1", "site-2"]
    assert lines[1].split()[1:] == ["0.500", "0.600", "0.700", "0.800", "0.650"]
    assert lines[2].split()[2:] == ["0.400", "0.600", "0.600", "0.800", "0.600"]
    assert lines[-1] == "federated - best site alone: +0.050 mean Dice (same steps per site)"
    assert max(len(line) for line in lines) <= 80


def test_comparison_lines_show_a_missing_score_as_a_dash() -> None:
    federated: dict[str, float | None] = {"dice_pancreas": None, "dice_mean": math.nan}
    lines = comparison_lines(federated, {"site-1": _dice((0.1, 0.2, 0.3, 0.4))})
    assert lines[1].split()[1:] == ["-", "-", "-", "-", "-"]
    assert len(lines) == 3  # no margin without a federated score


def test_site_alone_trains_each_site_and_scores_it_on_the_central_set(tmp_path: Path) -> None:
    opts = DemoOptions(
        out=tmp_path, sites=2, rounds=1, size=(16, 16, 16), cases_per_site=1, val_cases=1,
        overrides=("model.feature_scale=64", "train.steps=2", "train.patch_size=[16,16,16]",
                   "validation.patch_size=[16,16,16]"),
    )  # fmt: skip
    ensure_phantoms(opts)
    cfg = demo_config(opts, port=12345)
    datasets = {n: (opts.data_dir / n, opts.data_dir / n / "labels.toml") for n in opts.site_names}
    seen: list[str] = []
    first = site_alone(cfg, datasets, 2, tmp_path / "cache", on_site=seen.append)
    assert seen == ["site-1", "site-2"]
    assert set(first) == {"site-1", "site-2"}
    for dice in first.values():
        assert set(dice) == {*(f"dice_{o}" for o in ORGANS), "dice_mean"}
        assert all(0.0 <= v <= 1.0 for v in dice.values() if not math.isnan(v))
    assert site_alone(cfg, datasets, 2, tmp_path / "cache") == first  # same initial weights and seed each time


def test_each_site_alone_gets_the_steps_of_the_run_after_overrides() -> None:
    # `fed-server demo rounds=6 train.steps=30` (the demo's recipe before issue 16; --rounds defaults to 18): the
    # config's rounds count, 6 x 30
    assert steps_per_site(ServerConfig(rounds=6, train=TrainConfig(steps=30))) == 180
    assert steps_per_site(ServerConfig(rounds=2, train=TrainConfig(steps=None, epochs=3, steps_per_epoch=5))) == 30
