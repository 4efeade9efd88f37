"""The docs' Local tools page: examples/local-tools.sh is shown there verbatim and runs top to bottom."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "local-tools.sh"
#: The script's sizes shrunk to a few seconds of CPU work (its defaults are the values the page shows).
TINY = {"SIZE": "16,32,32", "PATCH": "16,32,32", "CASES": "1", "EPOCHS": "1", "STEPS": "1", "SCALE": "16"}


def test_the_local_tools_page_shows_the_script_verbatim() -> None:
    readme = (ROOT / "docs" / "local-tools.md").read_text(encoding="utf-8")
    assert f"```bash\n{SCRIPT.read_text(encoding='utf-8')}```" in readme


@pytest.mark.slow
def test_script_runs_top_to_bottom_on_phantoms(tmp_path: Path) -> None:
    env = {**os.environ, **TINY, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["COLUMNS"] = "80"
    done = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["local-tools"]  # nothing written beside its folder
    tmp_path = tmp_path / "local-tools"
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert [case["case"] for case in report["cases"]] == ["val_000", "val_001"]  # predict's names paired
    assert list(report["summary"]) == ["pancreas", "spleen", "kidney", "liver"]
    assert (tmp_path / "report.csv").read_text(encoding="utf-8").startswith("case,label,class,dice,")
    assert (tmp_path / "runs" / "central" / "metrics.csv").read_text(encoding="utf-8").splitlines()[1].startswith("1,")
    site3 = done.stdout[done.stdout.rindex("1 case(s), mean ±sd") :]  # the last table: site-3's own manifest
    assert "1 pancreas" in site3 and "4 liver" in site3 and "spleen" not in site3 and "kidney" not in site3
    assert max(len(line) for line in done.stdout.splitlines()) <= 80 and "…" not in done.stdout
