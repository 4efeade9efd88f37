"""The built wheel holds every module and data file: a subpackage missing from ``packages`` imports fine in an
editable install and would be silently absent from the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
IGNORED = (".git", "build", "dist", ".venv*", "*.egg-info", "__pycache__", ".*_cache", "runs", "fedseg-demo")

CHECK = """
import importlib, importlib.resources as res, pathlib, sys
import fedseg.common
root = pathlib.Path(fedseg.common.__path__[0]).parents[1]
assert "site-packages" in str(root), root
names = []
for side in ("common", "server", "client"):
    for path in sorted(pathlib.Path(sys.argv[1], side).rglob("*.py")):
        parts = [p for p in path.relative_to(pathlib.Path(sys.argv[1], side)).with_suffix("").parts if p != "__init__"]
        names.append(".".join(["fedseg", side, *parts]))
for name in names:
    importlib.import_module(name)
from fedseg.common.data.manifest import builtin_manifest_names, load_manifest
for manifest in builtin_manifest_names():
    load_manifest(manifest)
app = res.files("fedseg.server").joinpath("flwr_app", "pyproject.toml").read_text()
assert "fedseg.server.app:app" in app
print(len(names), "modules", len(builtin_manifest_names()), "manifests")
"""


@pytest.mark.slow
def test_the_wheel_installs_and_imports_every_module(tmp_path: Path) -> None:
    # Build from a copy: a stale build/ folder in the checkout would hide a package missing from the config.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*IGNORED))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("fedseg-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies come from this environment's site-packages (a plain path: its .pth files, such as the
    # editable install of this checkout, are not processed), so nothing is downloaded.
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    out = subprocess.run(
        [python, "-c", CHECK, str(ROOT)], capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == str(
        sum(1 for side in ("common", "server", "client") for _ in (ROOT / side).rglob("*.py"))
    )
