"""Checkpoints: exact round trip, atomic writes, clear errors for wrong architectures and foreign files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedseg.common.data.manifest import GLOBAL_CLASSES
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.checkpoint import (
    CheckpointMeta,
    changed_settings,
    config_hash,
    load_checkpoint,
    load_optimizer_state,
    read_meta,
    save_checkpoint,
)
from fedseg.common.errors import DataError, IncompatibleModelError
from fedseg.common.nn.model import ModelConfig, build_model

TINY = ModelConfig(arch="attention-unet", feature_scale=16)


def _meta(cfg: ModelConfig = TINY, **extra: object) -> CheckpointMeta:
    preprocess = PreprocessConfig()
    return CheckpointMeta(
        model=cfg,
        class_names=GLOBAL_CLASSES,
        preprocess=preprocess,
        patch_size=(16, 32, 32),
        config_hash=config_hash(model=cfg, preprocess=preprocess),
        seed=3,
        metrics={"dice_mean": 0.5, "dice_pancreas": float("nan")},
        epoch=7,
        **extra,  # type: ignore[arg-type]
    )


def _saved(tmp_path: Path, cfg: ModelConfig = TINY) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # move BN statistics off their defaults so buffers are checked too
        model(torch.randn(2, 1, 32, 32, 32))
    path = save_checkpoint(tmp_path / "ckpt" / "model.pt", model, _meta(cfg))
    return path, model.eval()


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    loaded, meta = load_checkpoint(path, expect=TINY, classes=GLOBAL_CLASSES)
    x = torch.randn(1, 1, 16, 32, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training
    assert meta.model == TINY
    assert meta.epoch == 7 and meta.seed == 3 and meta.patch_size == (16, 32, 32)
    assert meta.metrics["dice_mean"] == 0.5
    assert meta.preprocess == PreprocessConfig()
    assert read_meta(path).model_dump_json() == meta.model_dump_json()  # NaN metrics: compare as JSON


def test_checkpoint_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    save_checkpoint(path, build_model(TINY), _meta())  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_checkpoint_wrong_architecture_is_one_clear_line(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    with pytest.raises(IncompatibleModelError) as info:
        load_checkpoint(path, expect=ModelConfig(arch="unet", feature_scale=16))
    message = str(info.value)
    assert "\n" not in message
    assert "holds arch=attention-unet" in message and "but arch=unet" in message


def test_checkpoint_wrong_classes_raise(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    with pytest.raises(IncompatibleModelError, match="classes=background,spleen"):
        load_checkpoint(path, classes=("background", "spleen"))


def test_checkpoint_gate_init_difference_is_compatible(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    loaded, meta = load_checkpoint(path, expect=TINY.model_copy(update={"gate_init": "released"}))
    assert meta.model == TINY
    for (name, saved), restored in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(saved, restored), name


def test_checkpoint_weights_that_do_not_fit_raise(tmp_path: Path) -> None:
    model = build_model(ModelConfig(feature_scale=32))
    path = save_checkpoint(tmp_path / "bad.pt", model, _meta(TINY))  # metadata lies about the weights
    with pytest.raises(IncompatibleModelError, match="weights do not fit"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"not a checkpoint at all", "not a readable fedseg checkpoint"), (None, "not a fedseg checkpoint")],
)
def test_checkpoint_foreign_file_is_data_error(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "foreign.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_checkpoint_missing_file_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_optimizer_state_round_trip(tmp_path: Path) -> None:
    model = build_model(TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 32, 32, 32)).mean().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "opt.pt", model, _meta(), optimizer)
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert load_optimizer_state(path, fresh)
    step = next(iter(fresh.state_dict()["state"].values()))["step"]
    assert float(step) == 1.0
    no_opt = save_checkpoint(tmp_path / "plain.pt", model, _meta())
    assert not load_optimizer_state(no_opt, fresh)


def test_config_hash_is_stable_and_sensitive() -> None:
    pre = PreprocessConfig()
    same = ModelConfig(arch="attention-unet", feature_scale=16)
    assert config_hash(model=TINY, preprocess=pre) == config_hash(model=same, preprocess=pre)
    assert config_hash(model=TINY, preprocess=pre) != config_hash(model=ModelConfig(feature_scale=8), preprocess=pre)
    other_spacing = PreprocessConfig(target_spacing=(3.0, 2.0, 2.0))
    assert config_hash(model=TINY, preprocess=pre) != config_hash(model=TINY, preprocess=other_spacing)
    assert len(config_hash(model=TINY, preprocess=pre)) == 16


def test_changed_settings_names_the_fields_that_differ() -> None:
    pre = PreprocessConfig()
    meta = CheckpointMeta(
        model=TINY,
        class_names=("background", "pancreas"),
        preprocess=pre,
        patch_size=(16, 16, 16),
        config_hash=config_hash(model=TINY, preprocess=pre),
        seed=0,
    )
    assert changed_settings(meta, TINY, pre) == []
    wider = ModelConfig(arch="attention-unet", feature_scale=8)
    coarser = PreprocessConfig(target_spacing=(3.0, 2.0, 2.0))
    assert changed_settings(meta, wider, coarser) == ["model.feature_scale", "preprocess.target_spacing"]
