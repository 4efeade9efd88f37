"""Writing a MONAI bundle folder: configs, the TorchScript network with its metadata inside, docs and the script.

Layout (the MONAI Bundle specification's, plus ``scripts/``, which ``monai.bundle run`` puts on the path)::

    configs/metadata.json   configs/inference.json   models/model.ts   docs/README.md
    scripts/__init__.py     scripts/fedseg_transforms.py
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data.torchscript_utils import save_net_with_metadata

from fedseg.common.engine.checkpoint import CheckpointMeta
from fedseg.common.export import bundle_transforms
from fedseg.common.export.bundleconfig import inference_config
from fedseg.common.export.bundledocs import readme
from fedseg.common.export.bundlemeta import metadata
from fedseg.common.export.torchscript import CONTRACT_ENTRY

CONFIG_FILE = Path("configs") / "inference.json"
META_FILE = Path("configs") / "metadata.json"
MODEL_FILE = Path("models") / "model.ts"
README_FILE = Path("docs") / "README.md"
SCRIPT_FILE = Path("scripts") / "fedseg_transforms.py"


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def write_bundle(
    folder: Path, traced: torch.jit.ScriptModule, meta: CheckpointMeta, source: str, contract: dict[str, Any]
) -> Path:
    """Write the bundle of ``traced`` (the network from ``source``) into ``folder`` (created)."""
    meta_values = metadata(meta, source)
    _write_json(folder / META_FILE, meta_values)
    _write_json(folder / CONFIG_FILE, inference_config(meta))
    (folder / MODEL_FILE).parent.mkdir(parents=True, exist_ok=True)
    extra = {CONTRACT_ENTRY: json.dumps(contract, indent=2).encode()}
    save_net_with_metadata(
        traced, str(folder / MODEL_FILE), include_config_vals=False, meta_values=meta_values, more_extra_files=extra
    )
    script = folder / SCRIPT_FILE
    script.parent.mkdir(parents=True, exist_ok=True)
    (script.parent / "__init__.py").write_text('"""Components of this bundle\'s configs."""\n', encoding="utf-8")
    script.write_text(Path(bundle_transforms.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    write_readme(folder, meta, source)
    return folder


def write_readme(folder: Path, meta: CheckpointMeta, source: str, measured: Sequence[str] = ()) -> Path:
    """(Re)write ``docs/README.md``, with the lines about what the export measured."""
    path = folder / README_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(readme(meta, source, measured), encoding="utf-8")
    return path
