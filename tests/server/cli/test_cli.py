"""`fed-server start` / `demo` argument handling (no Flower started) and the demo's building blocks."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedseg.common.errors import ConfigError, DataError
from fedseg.server.cli.demo import demo_command
from fedseg.server.cli.main import app
from fedseg.server.control.baselines import steps_per_site
from fedseg.server.control.demo import DemoOptions, demo_config, ensure_phantoms, fresh_run_dir, join_argv
from fedseg.server.control.runs import stage_app, write_run_config

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "--config", "a.toml", "--resume", "b"], "pass either --config (new run) or --resume RUN_DIR"),
        (["start", "rounds"], "override 'rounds' must look like key=value, e.g. rounds=5 or train.lr=1e-4"),
        (["start", "rounds=0"], "overrides: rounds: Input should be greater than or equal to 1"),
        (["start", "--config", "missing.toml"], "config file missing.toml does not exist"),
        (["start", "--resume", "nowhere"], "nowhere is not a fed-server run folder (no config.json)"),
        (["demo", "--size", "40,40"], "--size must be three positive integers like 96,96,64, got '40,40'"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code in (1, 2), result.output
    assert message in result.output.replace("\n", " ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_start_refuses_a_validation_device_this_machine_lacks(tmp_path: Path) -> None:
    args = ["start", f"validation.data={tmp_path}", "validation.device=cuda", f"output_dir={tmp_path / 'run'}"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "validation.device = cuda but CUDA is not available here; use cpu" in result.output.replace("\n", " ")


def test_stage_app_holds_only_the_thin_pyproject(tmp_path: Path) -> None:
    folder = stage_app(tmp_path / "app")
    assert [p.name for p in folder.iterdir()] == ["pyproject.toml"]
    text = (folder / "pyproject.toml").read_text()
    assert 'serverapp = "fedseg.server.app:app"' in text
    assert 'clientapp = "fedseg.client.app:app"' in text
    (folder / "stale.toml").write_text("x")
    assert [p.name for p in stage_app(folder).iterdir()] == ["pyproject.toml"]


def test_run_config_file_carries_the_spec_as_json(tmp_path: Path) -> None:
    import tomllib

    from fedseg.server.config import RunSpec, ServerConfig

    spec = RunSpec(config=ServerConfig(rounds=4), first_round=2)
    data = tomllib.loads(write_run_config(spec, tmp_path / "rc.toml").read_text())
    assert RunSpec.model_validate(json.loads(data["config-json"])) == spec


def test_demo_config_uses_small_settings_all_sites_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "data" / "validation").mkdir(parents=True)
    opts = DemoOptions(out=tmp_path, sites=3, rounds=4, overrides=("train.steps=7",))
    cfg = demo_config(opts, port=12345)
    assert (cfg.rounds, cfg.min_sites, cfg.port) == (4, 3, 12345)
    assert cfg.model.feature_scale == 16
    assert cfg.train.steps == 7
    assert cfg.output_dir == tmp_path / "run"
    assert cfg.validation.data == tmp_path / "data" / "validation"


def test_demo_defaults_are_18_rounds_of_10_steps_and_keep_180_steps_per_site(tmp_path: Path) -> None:
    # issue 16: more, shorter rounds at the same 180 steps per site (6 x 30 before) is the demo's recipe
    (tmp_path / "data" / "validation").mkdir(parents=True)
    cfg = demo_config(DemoOptions(out=tmp_path), port=12345)
    assert (cfg.rounds, cfg.train.steps) == (18, 10)
    assert steps_per_site(cfg) == 180
    assert inspect.signature(demo_command).parameters["rounds"].default == 18  # `fed-server demo` without --rounds


def test_join_argv_runs_this_interpreter() -> None:
    argv = join_argv("site-2", Path("/d/site-2"), "127.0.0.1:5", Path("/w"))
    assert argv[0] == sys.executable
    assert argv[3:9] == ["join", "--site", "site-2", "--data", "/d/site-2", "--labels"]
    assert argv[-4:] == ["--server", "127.0.0.1:5", "--workdir", "/w"]


def test_fresh_run_dir_removes_only_a_previous_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    fresh_run_dir(run)
    assert not run.exists()
    run.mkdir()
    (run / "precious.txt").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a fed-server run"):
        fresh_run_dir(run)


def test_ensure_phantoms_refuses_a_folder_with_too_few_sites(tmp_path: Path) -> None:
    (tmp_path / "data" / "site-1").mkdir(parents=True)
    (tmp_path / "data" / "site-1" / "dataset.json").write_text("{}")
    with pytest.raises(DataError, match="lacks site-2; delete"):
        ensure_phantoms(DemoOptions(out=tmp_path, sites=2))
