"""The import graph of the package follows the layering each ``__init__.py`` states."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SIDES = ("common", "server", "client")
CLI_PACKAGES = ("fedseg.common.cli", "fedseg.server.cli", "fedseg.client.cli")

#: fedseg.common subpackage -> the fedseg.common parts it may import (besides itself).
COMMON_LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "console": set(),
    "nn": {"errors"},
    "data": {"errors", "console"},
    "datasets": {"data", "errors", "console"},
    "synthetic": {"data", "errors", "console"},
    "eval": {"data", "errors", "console"},
    "engine": {"nn", "data", "eval", "errors", "console"},
    "export": {"nn", "data", "engine", "eval", "errors", "console"},
    "privacy": {"nn", "data", "engine", "errors"},
    "fl": {"nn", "data", "engine", "privacy", "errors"},
    "runtime": {"errors"},
}
#: server/client part -> parts of the same side it must never import.
SIDE_FORBIDDEN: dict[str, set[str]] = {
    "fedseg.server.run": {"fedseg.server.cli", "fedseg.server.control"},
    "fedseg.server.control": {"fedseg.server.cli"},
    "fedseg.server.config": {"fedseg.server.cli", "fedseg.server.control", "fedseg.server.run"},
    "fedseg.client.app": {"fedseg.client.cli"},
    "fedseg.client.training": {"fedseg.client.cli"},
    "fedseg.client.site": {"fedseg.client.cli"},
    "fedseg.client.supernode": {"fedseg.client.cli"},
}


def _modules() -> Iterator[tuple[str, Path]]:
    for side in SIDES:
        for path in sorted((ROOT / side).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / side).with_suffix("").parts if p != "__init__"]
            yield ".".join(["fedseg", side, *parts]), path


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in the file (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


GRAPH = {name: _imports(path) for name, path in _modules()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _common_part(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["fedseg", "common"] else None


def test_the_graph_covers_every_subpackage() -> None:
    parts = {_common_part(m) for m in GRAPH}
    assert set(COMMON_LAYERS) | {"cli"} == parts - {None}


def test_only_cli_packages_import_typer_or_the_cli_helpers() -> None:
    offenders = [
        f"{module} imports {name}"
        for module, names in GRAPH.items()
        if not any(_within(module, cli) for cli in CLI_PACKAGES)
        for name in names
        if _within(name, "typer") or _within(name, "fedseg.common.cli")
    ]
    assert offenders == []


def test_common_subpackages_import_only_lower_layers() -> None:
    offenders = []
    for module, names in GRAPH.items():
        part = _common_part(module)
        if part is None or part == "cli":
            continue
        for name in names:
            used = _common_part(name)
            if used is not None and used != part and used not in COMMON_LAYERS[part]:
                offenders.append(f"{module} imports {name}")
        offenders += [
            f"{module} imports {n}" for n in names if _within(n, "fedseg.server") or _within(n, "fedseg.client")
        ]
    assert offenders == []


@pytest.mark.parametrize(("part", "forbidden"), sorted(SIDE_FORBIDDEN.items()))
def test_server_and_client_layers(part: str, forbidden: set[str]) -> None:
    offenders = [
        f"{module} imports {name}"
        for module, names in GRAPH.items()
        if _within(module, part)
        for name in names
        if any(_within(name, f) for f in forbidden)
    ]
    assert offenders == []


def _loaded_after(statement: str, block: str = "") -> set[str]:
    """Module names loaded by ``statement`` in a fresh interpreter; ``block`` names a package made unimportable."""
    blocker = (
        f"import sys; sys.modules[{block!r}] = None; "  # an entry of None makes `import block` raise ImportError
        if block
        else ""
    )
    code = f"{blocker}{statement}; import sys; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(out.stdout.split())


def test_the_client_app_needs_no_matplotlib_and_loads_no_cli_or_figures() -> None:
    # MONAI imports matplotlib.pyplot whenever it is installed (monai.utils.jupyter_utils) and flwr imports typer
    # (flwr.supercore.logger); what fedseg controls is that a site round never needs either of them.
    loaded = _loaded_after("import fedseg.client.app", block="matplotlib")
    ours = {m for m in loaded if m.startswith("fedseg.")}
    assert "fedseg.client.app" in ours
    assert not {m for m in ours if _within(m, "fedseg.common.cli") or _within(m, "fedseg.client.cli")}
    assert "fedseg.common.eval.attention_export" not in ours
    assert "fedseg.common.synthetic.phantoms" not in ours


def test_the_wire_contract_does_not_load_the_training_loop() -> None:
    loaded = _loaded_after("import fedseg.common.fl.protocol")
    assert "fedseg.common.fl.protocol" in loaded
    assert "fedseg.common.engine.train" not in loaded
    assert "fedseg.common.data.sampling" not in loaded
