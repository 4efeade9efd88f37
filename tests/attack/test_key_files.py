"""Private key files are the caller's alone: created new, 0600, never through a link planted at their path.

``fed-client keygen`` checked ``exists()`` (false for a dangling link) and then wrote ``site-key.pub`` through
whatever link was there, creating the link's target; a dangling link at ``site-key`` ended in a traceback.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.client.cli.main import app as client_app

runner = CliRunner()


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask: a key's mode must come from its creation, not from the umask."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_keygen_makes_a_0600_key_whatever_the_umask(tmp_path: Path, open_umask: None) -> None:
    result = runner.invoke(client_app, ["keygen", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "site-key").stat().st_mode) == 0o600


@pytest.mark.parametrize("planted", ["site-key", "site-key.pub"])
def test_keygen_refuses_a_dangling_link_in_one_line_and_creates_nothing(tmp_path: Path, planted: str) -> None:
    target = tmp_path / "attacker-chosen"
    (tmp_path / planted).symlink_to(target)
    assert not (tmp_path / planted).exists()  # dangling: what the old exists() check let through
    result = runner.invoke(client_app, ["keygen", "--out", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "already exists; a site key is never overwritten" in lines[0], result.output
    assert not target.exists()  # the link was not followed
    assert sorted(p.name for p in tmp_path.iterdir()) == [planted]  # no half pair left behind
