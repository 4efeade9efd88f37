"""``fed-eval export``: a checkpoint as TorchScript, ONNX or a MONAI bundle, with its parity measured on a CT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedseg.common.cli.shell import fail, guarded, result_table, stdout_console
from fedseg.common.export.bundlecheck import MIN_DICE, BundleAgreement
from fedseg.common.export.exporter import FORMATS, ExportResult, export
from fedseg.common.export.parity import MAX_ABS_DIFF, MIN_AGREEMENT, Parity

FORMAT_HELP = (
    "torchscript: model.ts (traced) + model.json. onnx: model.onnx (opset 18, batch and z, y, x axes dynamic, "
    "each side a multiple of 16) + model.json. bundle: a MONAI bundle (configs/, models/model.ts, docs/, scripts/) "
    "that python -m monai.bundle run executes with MONAI alone. model.json names the tensors and the preprocessing."
)


@guarded
def export_command(
    model_path: Annotated[
        Path,
        typer.Option(
            "--model", help="Checkpoint (.pt): fed-eval train's best.pt or fed-server's OUTPUT_DIR/checkpoints/best.pt."
        ),
    ],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP, metavar="|".join(FORMATS))],
    out: Annotated[Path, typer.Option("--out", help="Export folder; must not exist (written whole or not at all).")],
    check: Annotated[
        Path | None,
        typer.Option(
            "--check",
            help="A CT (NIfTI, or a DICOM folder except for bundles) to measure parity on: the export and PyTorch "
            "both predict it whole (fp32, CPU); a bundle is also run by MONAI and compared with fed-eval predict.",
        ),
    ] = None,
) -> None:
    """Export a checkpoint for other runtimes; with --check, measure that it is the same model.

    Parity: softmax max abs difference <= 1e-4 and argmax agreement >= 99.99 % over the whole CT.

    A bundle also needs Dice >= 0.99 with fed-eval predict for every organ, on the input's exact grid.

    Exit 1 when a check misses; the export is written all the same. ONNX and running a bundle need the export extra.
    """
    result = export(model_path, fmt, out, check)
    console = stdout_console()
    _render(console, result)
    problems = _problems(result)
    if problems:
        raise fail(f"{out}: written, but {'; '.join(problems)}")


def _render(console: Console, result: ExportResult) -> None:
    table = result_table(console, f"Export ({result.format}) in {escape(str(result.out))}")
    for column in ("file", "bytes"):
        table.add_column(column, justify="right" if column == "bytes" else "left", overflow="fold")
    for file in result.files:
        table.add_row(escape(str(file)), f"{(result.out / file).stat().st_size:,}")
    console.print(table)
    done = "written and checked" if result.parity is not None else "written"
    console.print(f"{done} in {result.export_seconds:.1f} s", highlight=False)
    if result.parity is not None:
        _render_parity(console, result.parity)
    if result.bundle is not None:
        _render_bundle(console, result.bundle)


def _render_parity(console: Console, parity: Parity) -> None:
    shape = "x".join(map(str, parity.shape))
    table = result_table(console, f"Parity: {parity.runtime} vs PyTorch, sliding window over a {shape} CT")
    for column in ("measure", "value", "required", "ok"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    diff_ok, agree_ok = parity.max_abs_diff <= MAX_ABS_DIFF, parity.agreement >= MIN_AGREEMENT
    agreement, required = f"{100 * parity.agreement:.4f} %", f">= {100 * MIN_AGREEMENT:.2f} %"
    table.add_row("softmax max abs diff", f"{parity.max_abs_diff:.2e}", f"<= {MAX_ABS_DIFF:.0e}", _yes(diff_ok))
    table.add_row("argmax agreement", agreement, required, _yes(agree_ok))
    table.add_row("PyTorch seconds", f"{parity.torch_seconds:.1f}", "", "")
    table.add_row(f"{parity.runtime} seconds", f"{parity.export_seconds:.1f}", "", "")
    console.print(table)


def _render_bundle(console: Console, bundle: BundleAgreement) -> None:
    table = result_table(console, "Bundle (MONAI alone) vs fed-eval predict (fp32), on the input's grid")
    for column in ("organ", "predict voxels", "bundle voxels", "Dice", "ok"):
        table.add_column(column, justify="left" if column == "organ" else "right")
    for organ in bundle.organs:
        ok = organ.dice >= MIN_DICE
        table.add_row(organ.name, f"{organ.fedseg_voxels:,}", f"{organ.bundle_voxels:,}", f"{organ.dice:.4f}", _yes(ok))
    table.add_row("geometry", "", "", bundle.geometry or "same", _yes(bundle.geometry is None))
    console.print(table)
    console.print(
        f"bundle run {bundle.bundle_seconds:.1f} s (interpreter and imports included), "
        f"fedseg {bundle.fedseg_seconds:.1f} s",
        highlight=False,
    )


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _problems(result: ExportResult) -> list[str]:
    """One phrase per check that missed its threshold."""
    problems = []
    parity = result.parity
    if parity is not None and not parity.ok:
        problems.append(
            f"parity not reached (max abs diff {parity.max_abs_diff:.2e}, agreement {100 * parity.agreement:.4f} %)"
        )
    bundle = result.bundle
    if bundle is not None and bundle.geometry is not None:
        problems.append(f"the bundle's label map is off the input's grid ({bundle.geometry})")
    if bundle is not None:
        low = [f"{o.name} {o.dice:.4f}" for o in bundle.organs if o.dice < MIN_DICE]
        if low:
            problems.append(f"bundle Dice below {MIN_DICE} ({', '.join(low)})")
    return problems
