"""``fed-eval export``'s work: checkpoint in, one export folder out, and with a CT to check on, its parity.

Formats and what the folder holds:

* ``torchscript``: ``model.ts`` (traced; the contract inside as ``fedseg.json``) and ``model.json``;
* ``onnx``: ``model.onnx`` (opset 18, dynamic batch and spatial axes, ``onnx.checker`` clean) and ``model.json``;
* ``bundle``: a MONAI bundle (:mod:`.bundle`).

Every format also gets ``MODEL_CARD.md`` (:mod:`.modelcard`); a bundle's ``docs/README.md`` links it.

With ``check`` the exported model, loaded back from the folder, and the PyTorch network both predict that CT
whole (:mod:`.parity`); a bundle is also run by MONAI alone and compared with fedseg's label map
(:mod:`.bundlecheck`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import nn

from fedseg.common.console import console
from fedseg.common.data.io import is_nifti, read_volume
from fedseg.common.data.manifest import default_manifest
from fedseg.common.data.preprocess import preprocess_case
from fedseg.common.engine.checkpoint import CheckpointMeta, load_checkpoint
from fedseg.common.errors import ConfigError, DataError
from fedseg.common.export import contract, onnxmodel, torchscript
from fedseg.common.export.bundle import MODEL_FILE, write_bundle, write_readme
from fedseg.common.export.bundlecheck import BundleAgreement, compare
from fedseg.common.export.deps import BUNDLE_RUN_PACKAGES, ONNX_PACKAGES, require
from fedseg.common.export.modelcard import checkpoint_facts, write_card
from fedseg.common.export.parity import Parity, measure
from fedseg.common.export.staging import check_new, staged

log = logging.getLogger(__name__)

Format = Literal["torchscript", "onnx", "bundle"]
FORMATS: tuple[Format, ...] = get_args(Format)
CONTRACT_FILE = "model.json"


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote and measured.

    Attributes:
        format: the format written.
        out: the export folder.
        files: the files in it, relative to ``out``.
        export_seconds: loading the checkpoint excluded, writing and checking the files included.
        parity: the exported model against PyTorch on the check CT (None without ``check``).
        bundle: the bundle run by MONAI against fedseg's label map (bundles with ``check`` only).
    """

    format: Format
    out: Path
    files: tuple[Path, ...]
    export_seconds: float
    parity: Parity | None = None
    bundle: BundleAgreement | None = None

    @property
    def ok(self) -> bool:
        """Every check that ran reached its threshold."""
        return (self.parity is None or self.parity.ok) and (self.bundle is None or self.bundle.ok)


def check_request(fmt: str, out: Path, check: Path | None) -> Format:
    """Refuse a request that cannot succeed before any work is done; returns the format.

    Raises:
        ConfigError: unknown format, existing ``out``, missing extra packages.
        DataError: ``check`` is missing, or not a NIfTI file where the bundle must read it.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_new(out)
    if check is not None and not check.exists():
        raise DataError(f"--check {check}: no such file or folder")
    if fmt == "onnx":
        require(ONNX_PACKAGES, "--format onnx")
    if fmt == "bundle" and check is not None:
        if not (check.is_file() and is_nifti(check)):
            raise DataError(f"--check {check}: a bundle is checked on a NIfTI file (.nii/.nii.gz), which MONAI reads")
        require(BUNDLE_RUN_PACKAGES, "running the bundle (--check)")
    return fmt


def export(model_path: Path, fmt: str, out: Path, check: Path | None = None) -> ExportResult:
    """Export the checkpoint at ``model_path`` as ``fmt`` into the new folder ``out``; check it on ``check``.

    Raises:
        ConfigError: see :func:`check_request`.
        DataError: the checkpoint or the check image cannot be read, or the bundle did not run.
        IncompatibleModelError: the network cannot be exported in this format.
    """
    chosen = check_request(fmt, out, check)
    model, meta = load_checkpoint(model_path)
    prepared = _prepared(check, meta) if check is not None else None
    with _progress() as step, staged(out) as folder:
        start = time.perf_counter()
        step(f"writing {chosen}")
        runtime, name = WRITERS[chosen](model, meta, model_path, folder)
        write_card(folder, checkpoint_facts(model, meta, model_path))
        measured = bundle = None
        if prepared is not None:
            step(f"parity: PyTorch and {name} over the whole CT")
            measured = measure(model, runtime, name, prepared, meta)
            _record_parity(folder, chosen, measured)
        if chosen == "bundle" and check is not None:
            step("running the bundle with MONAI alone")
            bundle = compare(model, meta, folder, check)
            write_readme(folder, meta, model_path.name, _measured_lines(measured, bundle))
        seconds = time.perf_counter() - start
        files = tuple(sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()))
    log.info("exported %s as %s into %s in %.1f s", model_path, chosen, out, seconds)
    return ExportResult(chosen, out, files, seconds, measured, bundle)


def _prepared(check: Path, meta: CheckpointMeta) -> np.ndarray:
    """The check CT on the checkpoint's prepared grid (what the network sees)."""
    case = preprocess_case(read_volume(check), None, default_manifest(), meta.preprocess)
    return case.image


Writer = Callable[[nn.Module, CheckpointMeta, Path, Path], tuple[nn.Module, str]]


def _torchscript(model: nn.Module, meta: CheckpointMeta, source: Path, folder: Path) -> tuple[nn.Module, str]:
    terms = contract.contract(meta, source, "model.ts", runtime="TorchScript (torch.jit.load)")
    torchscript.save(torchscript.trace(model), folder / "model.ts", terms)
    _write_json(folder / CONTRACT_FILE, terms)
    return torchscript.load(folder / "model.ts"), "TorchScript"


def _onnx(model: nn.Module, meta: CheckpointMeta, source: Path, folder: Path) -> tuple[nn.Module, str]:
    onnxmodel.export_onnx(model, folder / "model.onnx")
    terms = contract.contract(meta, source, "model.onnx", runtime="ONNX", opset=onnxmodel.OPSET)
    _write_json(folder / CONTRACT_FILE, terms)
    return onnxmodel.OnnxModule(folder / "model.onnx"), "onnxruntime (CPU)"


def _bundle(model: nn.Module, meta: CheckpointMeta, source: Path, folder: Path) -> tuple[nn.Module, str]:
    terms = contract.contract(meta, source, str(MODEL_FILE), runtime="MONAI bundle")
    write_bundle(folder, torchscript.trace(model), meta, source.name, terms)
    return torchscript.load(folder / MODEL_FILE), "TorchScript (bundle)"


WRITERS: dict[Format, Writer] = {"torchscript": _torchscript, "onnx": _onnx, "bundle": _bundle}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _record_parity(folder: Path, fmt: Format, measured: Parity) -> None:
    """Add the parity figures to ``model.json`` (torchscript, onnx); a bundle puts them in its README."""
    path = folder / CONTRACT_FILE
    if fmt == "bundle" or not path.is_file():
        return
    terms = json.loads(path.read_text(encoding="utf-8"))
    terms["parity"] = {
        "runtime": measured.runtime,
        "prepared_shape": list(measured.shape),
        "softmax_max_abs_diff": measured.max_abs_diff,
        "argmax_agreement": measured.agreement,
    }
    _write_json(path, terms)


def _measured_lines(measured: Parity | None, bundle: BundleAgreement) -> list[str]:
    lines = []
    if measured is not None:
        lines.append(
            f"TorchScript vs PyTorch on a {'x'.join(map(str, measured.shape))} prepared CT: softmax max abs "
            f"difference {measured.max_abs_diff:.1e}, argmax agreement {100 * measured.agreement:.4f} %."
        )
    if bundle.geometry is not None:
        lines.append(f"The bundle's label map is not on the input's grid: {bundle.geometry}.")
    lines += [f"Dice with fed-eval predict (fp32), {o.name}: {o.dice:.4f}." for o in bundle.organs]
    return lines


@contextmanager
def _progress() -> Iterator[Callable[[str], None]]:
    """A transient step counter on the log console; yields ``step(description)``."""
    columns = (SpinnerColumn(), TextColumn("[bold]export[/] {task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("", total=None)

        def step(description: str) -> None:
            log.info("%s", description)
            progress.update(task, description=description)

        yield step
