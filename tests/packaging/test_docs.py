"""The docs site builds with mkdocs --strict from references generated from the code, and a broken link fails it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))

from reference import cli_page, config_page, fields, metrics_page  # noqa: E402

from fedseg.client.policy import SitePolicy  # noqa: E402
from fedseg.server.config import ServerConfig  # noqa: E402
from fedseg.server.control.metrics import SERVER_METRICS  # noqa: E402


def test_the_references_name_every_command_field_and_metric() -> None:
    cli = cli_page()
    for command in ("## `fed-server start`", "## `fed-client join`", "## `fed-eval predict`", "## `fed-client audit`"):
        assert command in cli
    config = config_page()
    for key, _ in [*fields(ServerConfig), *fields(SitePolicy)]:
        assert f"| `{key}` |" in config
    assert "| `privacy.max_epsilon` |" in config and "| `strategy.root_data` |" in config
    metrics = metrics_page()
    assert all(f"| `{name}` |" in metrics for name in SERVER_METRICS)


@pytest.mark.slow
def test_mkdocs_strict_builds_and_fails_on_a_broken_link(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason='the docs extra: pip install -e ".[docs]"')
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", project / "docs", ignore=shutil.ignore_patterns("reference", "__pycache__"))
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")]  # -q hides warnings
    done = subprocess.run(build, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
    with (project / "docs" / "index.md").open("a", encoding="utf-8") as page:
        page.write("\nSee [a page that is not there](nowhere.md).\n")
    broken = subprocess.run(build, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0 and "nowhere.md" in broken.stderr


def test_the_readme_is_short_and_its_links_lead_somewhere() -> None:
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("\n") <= 200
    targets = [t for t in re.findall(r"\]\(([^)#]+)[^)]*\)", readme) if not t.startswith("http")]
    assert targets and all((ROOT / t).is_file() for t in targets), [t for t in targets if not (ROOT / t).is_file()]
