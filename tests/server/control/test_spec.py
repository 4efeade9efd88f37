"""A run request cannot rewrite the server config: the ServerApp accepts only the spec fed-server start wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.common.errors import ConfigError
from fedseg.server.app import trusted_spec
from fedseg.server.config import RUN_CONFIG_KEY, RunSpec
from fedseg.server.configfile import load_server_config
from fedseg.server.control.runs import SPEC_ENV, new_spec, write_spec


def _written(tmp_path: Path) -> tuple[RunSpec, Path]:
    spec = RunSpec(config=load_server_config(None, [f"output_dir={tmp_path / 'run'}"]))
    return spec, write_spec(spec, tmp_path / "private" / "run-spec.json")


def test_the_spec_fed_server_start_wrote_is_accepted(tmp_path: Path) -> None:
    spec, path = _written(tmp_path)
    assert trusted_spec({RUN_CONFIG_KEY: spec.model_dump_json()}, {SPEC_ENV: str(path)}) == spec


def test_a_crafted_config_pointing_at_another_run_folder_is_refused(tmp_path: Path) -> None:
    spec, path = _written(tmp_path)
    crafted = json.loads(spec.model_dump_json())
    crafted["config"]["output_dir"] = str(tmp_path / "victim")
    with pytest.raises(ConfigError, match=r"differs from the spec fed-server start wrote .*; run refused"):
        trusted_spec({RUN_CONFIG_KEY: json.dumps(crafted)}, {SPEC_ENV: str(path)})


def test_a_run_outside_fed_server_start_is_refused(tmp_path: Path) -> None:
    spec, _ = _written(tmp_path)
    with pytest.raises(ConfigError, match="FEDSEG_RUN_SPEC is not set"):
        trusted_spec({RUN_CONFIG_KEY: spec.model_dump_json()}, {})
    with pytest.raises(ConfigError, match="cannot read the run spec"):
        trusted_spec({RUN_CONFIG_KEY: spec.model_dump_json()}, {SPEC_ENV: str(tmp_path / "nope.json")})


def test_a_new_run_refuses_a_folder_that_has_a_history(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.json").write_text("[]")
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        new_spec(load_server_config(None, [f"output_dir={out}"]))
