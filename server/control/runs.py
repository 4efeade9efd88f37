"""Run folders: the files a run keeps (config, run config, thin FAB) and how ``--resume`` continues one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import tomli_w

from fedseg.common.engine.checkpoint import changed_settings, read_meta
from fedseg.common.engine.keeper import LAST, last_round
from fedseg.common.errors import ConfigError
from fedseg.server.config import RUN_CONFIG_KEY, RunSpec, ServerConfig
from fedseg.server.configfile import build_config, merge, parse_overrides
from fedseg.server.run.history import HISTORY_FILE
from fedseg.server.run.loop import CHECKPOINT_DIR

CONFIG_FILE = "config.json"
PRIVATE_DIR = ".fedseg"
#: The spec of the current run, written by ``fed-server start``; the only config the ServerApp accepts.
SPEC_FILE = "run-spec.json"
#: Environment variable (set on the SuperLink, inherited by the ServerApp) naming the spec file.
SPEC_ENV = "FEDSEG_RUN_SPEC"


def save_config(cfg: ServerConfig) -> Path:
    """Write the resolved config to ``<output_dir>/config.json`` (the record of the run, read by ``--resume``)."""
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.output_dir / CONFIG_FILE
    path.write_text(cfg.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def stage_app(folder: Path) -> Path:
    """A fresh folder holding only the thin FAB's ``pyproject.toml`` (Flower ships every .toml it finds)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    source = resources.files("fedseg.server").joinpath("flwr_app", "pyproject.toml")
    (folder / "pyproject.toml").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def write_run_config(spec: RunSpec, path: Path) -> Path:
    """The run-config override file for ``flwr run --run-config``: the spec as JSON under one key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({RUN_CONFIG_KEY: spec.model_dump_json()}), encoding="utf-8")
    return path


def write_spec(spec: RunSpec, path: Path) -> Path:
    """The spec file the ServerApp checks the submitted run config against (see :data:`SPEC_ENV`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.model_dump_json(), encoding="utf-8")
    return path


def new_spec(cfg: ServerConfig) -> RunSpec:
    """A run from round 1, refusing an output folder that already holds a run.

    Raises:
        ConfigError: ``output_dir`` already has checkpoints or a history (use ``--resume`` or another folder).
    """
    if (cfg.output_dir / CHECKPOINT_DIR / LAST).exists() or (cfg.output_dir / HISTORY_FILE).exists():
        raise ConfigError(
            f"{cfg.output_dir} already holds a run; continue it with --resume {cfg.output_dir} "
            "or set output_dir to a new folder"
        )
    return RunSpec(config=cfg)


def resume_spec(run_dir: Path, overrides: Sequence[str] = ()) -> RunSpec:
    """Continue the run in ``run_dir`` from its last completed round (new rounds keep counting up).

    Args:
        run_dir: an output folder of an earlier ``fed-server start``.
        overrides: ``key=value`` changes, e.g. ``rounds=30`` to extend a finished run.

    Raises:
        ConfigError: no run there, or it has already completed ``rounds``.
    """
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a fed-server run folder (no {CONFIG_FILE}); pass the output_dir of a run")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_path} is not valid JSON ({err})") from None
    raw = merge(raw, parse_overrides(overrides))
    raw["output_dir"] = str(run_dir.resolve())
    cfg = build_config(raw, run_dir.resolve(), str(config_path))
    done = last_round(cfg.output_dir / CHECKPOINT_DIR)
    if done is None:
        raise ConfigError(f"{run_dir} has no checkpoint to resume from; start a new run instead")
    if done >= cfg.rounds:
        raise ConfigError(f"{run_dir} already completed {done} of {cfg.rounds} rounds; pass rounds=N with N > {done}")
    last = cfg.output_dir / CHECKPOINT_DIR / LAST
    changed = changed_settings(read_meta(last), cfg.model, cfg.preprocess)
    if changed:
        raise ConfigError(
            f"{run_dir}: cannot resume with other {', '.join(changed)} than its checkpoints were trained with; "
            "start a new run for new model or preprocessing settings"
        )
    return RunSpec(config=cfg, first_round=done + 1, initial_checkpoint=last)
