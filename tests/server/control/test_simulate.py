"""fed-server simulate: a one-line hint without Ray, and settings that fit the phantoms and the site count."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fedseg.common.errors import ConfigError
from fedseg.server.configfile import parse_overrides
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
