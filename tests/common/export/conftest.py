"""Export-test fixtures: a small checkpoint whose preprocessing makes the real CT a 15 x 50 x 61 volume.

Feature scale 16 and 6 mm keep every sliding-window prediction of the real CT under a second or two; the
32 x 32 x 32 patch is deeper than the volume's 15 slices (so the window shrinks to 16 and pads, as in fedseg).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedseg.common.data.manifest import GLOBAL_CLASSES
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.checkpoint import CheckpointMeta, config_hash, save_checkpoint
from fedseg.common.nn.model import ModelConfig, build_model

PATCH = (32, 32, 32)


def write_checkpoint(path: Path, preprocess: PreprocessConfig, seed: int = 3, feature_scale: int = 16) -> Path:
    """A seeded, untrained Attention U-Net checkpoint with ``preprocess``."""
    torch.manual_seed(seed)
    model_cfg = ModelConfig(feature_scale=feature_scale)
    meta = CheckpointMeta(
        model=model_cfg,
        class_names=GLOBAL_CLASSES,
        preprocess=preprocess,
        patch_size=PATCH,
        config_hash=config_hash(model=model_cfg, preprocess=preprocess),
        seed=seed,
        round=3,
    )
    return save_checkpoint(path, build_model(model_cfg), meta)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fs 16, 6 mm isotropic, default HU window and volume z-score; seed 3 predicts all five classes on the real CT."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", PreprocessConfig(target_spacing=(6, 6, 6)))


@pytest.fixture(scope="session")
def ct_file() -> Path:
    """The real CT of tests/data (122 x 101 x 30 at 3 mm; see its README)."""
    return Path(__file__).parents[2] / "data" / "ct.nii.gz"
