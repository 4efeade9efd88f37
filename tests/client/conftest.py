"""Client-test fixtures: one tiny phantom site (16³, generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.common.synthetic.phantoms import generate_phantoms


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``site-1`` (2 cases) and ``validation`` (1 case), 16³ at 2 mm."""
    root = tmp_path_factory.mktemp("phantoms") / "data"
    generate_phantoms(root, sites=1, cases_per_site=2, val_cases=1, size=(16, 16, 16))
    return root
