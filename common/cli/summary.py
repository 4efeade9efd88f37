"""``fed-eval summary``: parameters, GFLOPs and training memory of the network at an input size."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fedseg.common.cli.shell import SIZE_HELP, guarded, parse_triple, result_table, stdout_console
from fedseg.common.errors import ConfigError
from fedseg.common.nn.model import ModelConfig, check_spatial_size
from fedseg.common.nn.summary import ModelSummary, summarize


@guarded
def summary_command(
    arch: Annotated[str, typer.Option(help="Network: attention-unet or unet.")] = "attention-unet",
    classes: Annotated[int, typer.Option(help="Output classes, background included.")] = 5,
    feature_scale: Annotated[int, typer.Option(help="Divides the base filters 64..1024 (paper: 4).")] = 4,
    input_size: Annotated[
        str, typer.Option("--input", help=f"Spatial input size {SIZE_HELP}; each side a multiple of 16.")
    ] = "96,160,160",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size for FLOPs and memory.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Show the network's parameters, forward GFLOPs and training activation memory (computed, not run)."""
    cfg = ModelConfig.model_validate({"arch": arch, "n_classes": classes, "feature_scale": feature_scale})
    size = _parse_input(input_size)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    result = summarize(cfg, size, batch_size)
    if as_json:
        typer.echo(json.dumps(summary_to_dict(result, cfg)))
    else:
        _render(result, cfg)


def _parse_input(text: str) -> tuple[int, int, int]:
    try:
        size = parse_triple(text, "--input")
    except typer.BadParameter as err:
        raise ConfigError(str(err)) from None
    try:
        check_spatial_size(size)
    except ValueError as err:
        raise ConfigError(f"--input: {err}") from None
    return size


def summary_to_dict(result: ModelSummary, cfg: ModelConfig) -> dict[str, object]:
    """The JSON form of a summary: arch, input (D, H, W), params, gflops, activation_bytes and per-part costs."""
    return {
        "arch": result.arch,
        "input": list(result.input_shape[2:]),
        "batch_size": result.input_shape[0],
        "in_channels": cfg.in_channels,
        "n_classes": cfg.n_classes,
        "feature_scale": cfg.feature_scale,
        "params": result.params,
        "gflops": result.gflops,
        "activation_bytes": result.activation_bytes,
        "param_state_bytes": result.param_state_bytes,
        "parts": [{"name": p.name, "params": p.params, "gflops": p.gflops} for p in result.parts],
    }


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n / 1e9:.2f} GB)"


def _render(result: ModelSummary, cfg: ModelConfig) -> None:
    out = stdout_console()
    batch, channels, *size = result.input_shape
    title = f"{result.arch}, {cfg.n_classes} classes, feature scale {cfg.feature_scale}, "
    title += f"batch {batch} x {channels} channel(s) x {','.join(map(str, size))} (z,y,x)"
    totals = result_table(out, title)
    totals.add_column("quantity", overflow="fold")
    totals.add_column("value", justify="right", overflow="fold")
    totals.add_row("Parameters", f"{result.params:,}")
    totals.add_row("Forward GFLOPs (conv/matmul, 2×MAC)", f"{result.gflops:.2f}")
    totals.add_row("Training activations (saved for backward, fp32)", _bytes(result.activation_bytes))
    totals.add_row("Weights + grads + Adam moments (fp32)", _bytes(result.param_state_bytes))
    out.print(totals)
    parts = result_table(out, "Per block, in execution order")
    for column in ("block", "parameters", "GFLOPs"):
        parts.add_column(column, justify="left" if column == "block" else "right", overflow="fold")
    for part in result.parts:
        parts.add_row(part.name, f"{part.params:,}", f"{part.gflops:.2f}")
    out.print(parts)
