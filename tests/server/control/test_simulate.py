"""fed-server simulate: a one-line hint without Ray, and settings that fit the phantoms and the site count."""

from __future__ import annotations

import importlib
import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

import fedseg.server.control.simulate as simulate_module
from fedseg.client.simulated import site_for
from fedseg.common.errors import ConfigError
from fedseg.server.app import trusted_spec
from fedseg.server.configfile import parse_overrides
from fedseg.server.control.runs import SPEC_ENV
from fedseg.server.control.simulate import RAY_HINT, SimOptions, sim_defaults, simulate


def test_without_ray_the_command_stops_with_the_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        simulate(SimOptions(out=tmp_path, sites=2))
    assert str(err.value) == RAY_HINT
    assert "\n" not in RAY_HINT and "fedseg[simulation]" in RAY_HINT
    assert not any(tmp_path.iterdir())  # nothing generated before the check


def test_defaults_fit_small_phantoms_and_grow_the_round_budget_with_sites() -> None:
    raw = parse_overrides(sim_defaults((32, 32, 32), 10))
    assert raw["train"]["patch_size"] == [32, 32, 32]
    assert raw["validation"]["patch_size"] == [32, 32, 32]
    assert raw["round_timeout"] == 240.0 + 300.0
    big = parse_overrides(sim_defaults((64, 96, 96), 100))
    assert big["train"]["patch_size"] == [32, 48, 48] and big["validation"]["patch_size"] == [48, 48, 48]
    assert big["site_wait_timeout"] == 240.0 + 3000.0


def test_the_engine_gets_our_apps_the_sites_and_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = importlib.import_module("flwr.simulation.run_simulation")  # the module; the package exports a function

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(engine, "_run_simulation", lambda **kw: calls.append(kw))
    monkeypatch.setattr(simulate_module, "require_ray", lambda: None)  # CI has no Ray; the engine is faked anyway
    monkeypatch.delenv(SPEC_ENV, raising=False)
    monkeypatch.delenv("FLWR_HOME", raising=False)
    spec = simulate(SimOptions(out=tmp_path, sites=3, rounds=2, size=(16, 16, 16), cases_per_site=1, cpus_per_site=0.5))
    (call,) = calls
    assert call["num_supernodes"] == 3 and call["is_app"] is True
    assert call["backend_config"]["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert (call["server_app_attr"], call["client_app_attr"]) == ("fedseg.server.app:app", "fedseg.client.app:app")
    server_config = call["server_app_context"].run_config
    # the ServerApp accepts exactly the spec written for it, as under fed-server start
    assert trusted_spec(server_config, {SPEC_ENV: os.environ[SPEC_ENV]}) == spec
    assert spec.config.min_sites == 3 and spec.config.rounds == 2
    # every virtual site reads the same run config from the app folder, and partition 2 is site-3
    project = tomllib.loads((Path(call["app_dir"]) / "pyproject.toml").read_text(encoding="utf-8"))
    site_config = project["tool"]["flwr"]["app"]["config"]
    assert site_config == server_config
    site = site_for({"partition-id": 2, "num-partitions": 3}, site_config)
    assert site.site == "site-3" and (site.data / "labels.toml").is_file()
