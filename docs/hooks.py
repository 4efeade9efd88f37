"""mkdocs hook: write the generated reference pages before every build (see docs/reference.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import write_reference


def on_pre_build(config: Any) -> None:
    """Regenerate ``docs/reference/*.md`` from the code."""
    write_reference(Path(config["docs_dir"]) / "reference")
