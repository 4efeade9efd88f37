"""One version, written in pyproject.toml: what the three commands print and the changelog's newest release."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.client.cli.main import app as client_app
from fedseg.common.cli.main import app as eval_app
from fedseg.common.cli.shell import fedseg_version
from fedseg.server.cli.main import app as server_app

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_version_is_pyprojects() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert fedseg_version() == declared


APPS = [("fed-server", server_app), ("fed-client", client_app), ("fed-eval", eval_app)]


@pytest.mark.parametrize(("name", "app"), APPS)
def test_every_command_prints_the_version(name: str, app: object) -> None:
    result = CliRunner().invoke(app, ["--version"])  # type: ignore[arg-type]
    assert result.exit_code == 0
    assert result.stdout.strip() == f"{name} (fedseg) {fedseg_version()}"


def test_the_changelogs_newest_release_is_the_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, flags=re.MULTILINE)
    assert releases and releases[0] == fedseg_version()
    assert text.index("## [Unreleased]") < text.index(f"## [{releases[0]}]")
