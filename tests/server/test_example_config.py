"""examples/server.toml works as written on `fed-eval phantoms` output, and docs/getting-started.md quotes it."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.configfile import load_server_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "server.toml"


def test_example_config_loads_against_phantoms_laid_out_as_documented(tmp_path: Path) -> None:
    # the layout the example's comment describes: the repository root holds data/ and examples/
    generate_phantoms(tmp_path / "data", sites=2, cases_per_site=1, val_cases=1, size=(16, 16, 16))
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "examples" / "server.toml")
    cfg = load_server_config(tmp_path / "examples" / "server.toml")
    assert cfg.validation.data == (tmp_path / "data" / "validation").resolve()
    assert cfg.output_dir == (tmp_path / "runs" / "local").resolve()
    assert cfg.min_sites == 2 and (tmp_path / "data" / "site-2").is_dir()
    assert cfg.metrics.port == 9300 and cfg.metrics.host == "127.0.0.1"
    assert cfg.loopback


def test_getting_started_quotes_the_example() -> None:
    readme = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    body = "\n".join(line for line in EXAMPLE.read_text(encoding="utf-8").splitlines() if not line.startswith("#"))
    assert body.strip() in readme
