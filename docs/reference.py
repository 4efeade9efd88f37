"""The reference pages, generated from the code so that they cannot drift from it.

* ``reference/cli.md``: every command and option of ``fed-server``, ``fed-client`` and ``fed-eval`` (from the Typer
  apps, through click's own command objects);
* ``reference/config.md``: every field of ``server.toml``, ``policy.toml`` and ``labels.toml`` with its type,
  default, constraints and description (from the pydantic models);
* ``reference/metrics.md``: every Prometheus metric of the server and the sites with its type and labels (from the
  exporters' own metric objects).

``mkdocs build`` writes them through ``docs/hooks.py``; ``python docs/reference.py OUT_DIR`` writes them anywhere.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import click
import typer
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fedseg.client.cli.main import app as client_app
from fedseg.client.policy import SitePolicy
from fedseg.client.telemetry import SiteMetrics
from fedseg.common.cli.main import app as eval_app
from fedseg.common.data.manifest import LabelManifest
from fedseg.server.cli.main import app as server_app
from fedseg.server.config import ServerConfig
from fedseg.server.control.metrics import ServerMetrics

APPS = (("fed-server", server_app), ("fed-client", client_app), ("fed-eval", eval_app))
CONFIGS = (
    ("server.toml", ServerConfig, "what `fed-server start --config` reads (every key also works as `key=value`)"),
    ("policy.toml", SitePolicy, "a site's limits on what the server may ask (next to its labels, or `--policy`)"),
    ("labels.toml", LabelManifest, "a site's label manifest: its label values -> fedseg's classes"),
)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cli_page() -> str:
    """Markdown for every command and option."""
    lines = ["# Command-line reference", "", "Generated from the Typer apps; `--help` prints the same.", ""]
    for name, app in APPS:
        lines += _command_section(name, typer.main.get_command(app))
    return "\n".join(lines) + "\n"


def _command_section(path: str, command: click.Command) -> list[str]:
    lines = [f"## `{path}`", "", _cell(command.help or ""), ""]
    options = [p for p in command.params if isinstance(p, click.Option | click.Argument)]
    if options:
        lines += ["| option | type | default | help |", "| --- | --- | --- | --- |"]
        lines += [_param_row(p) for p in options]
        lines.append("")
    if isinstance(command, click.Group):
        for sub in sorted(command.commands):
            lines += _command_section(f"{path} {sub}", command.commands[sub])
    return lines


def _param_row(param: click.Parameter) -> str:
    names = ", ".join(f"`{o}`" for o in [*param.opts, *getattr(param, "secondary_opts", [])]) or f"`{param.name}`"
    default = param.default if param.default not in (None, ()) and not callable(param.default) else ""
    help_text = getattr(param, "help", None) or ("argument" if isinstance(param, click.Argument) else "")
    return f"| {names} | {_cell(param.type.name)} | {_cell(default)} | {_cell(help_text)} |"


def config_page() -> str:
    """Markdown for every field of the three configuration files."""
    lines = ["# Configuration reference", "", "Generated from the pydantic models the files are validated by.", ""]
    for name, model, what in CONFIGS:
        lines += [f"## `{name}`", "", what + ".", "", "| key | type | default | constraints | description |"]
        lines.append("| --- | --- | --- | --- | --- |")
        lines += [_field_row(key, field) for key, field in fields(model)]
        lines.append("")
    return "\n".join(lines) + "\n"


def fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) of ``model`` and of the models nested in it (as TOML tables)."""
    for name, field in model.model_fields.items():
        nested = [t for t in _types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            for sub in nested:
                yield from fields(sub, f"{prefix}{name}.")
        else:
            yield prefix + name, field


def _types(annotation: object) -> tuple[object, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _field_row(key: str, field: FieldInfo) -> str:
    kind = _cell(_type_name(field.annotation))
    if field.default is not PydanticUndefined:
        value = str(field.default) if isinstance(field.default, Path) else field.default
        default = f"`{value!r}`"
    else:
        default = "(computed)" if field.default_factory is not None else "**required**"
    constraints = ", ".join(_constraint(m) for m in field.metadata) or ""
    return f"| `{key}` | {kind} | {_cell(default)} | {_cell(constraints)} | {_cell(field.description or '')} |"


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if get_origin(annotation) is None else None
    return text or repr(annotation).replace("typing.", "").replace("pathlib.", "")


def _constraint(meta: object) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "max_length": "length <="}
    for attr, symbol in symbols.items():
        value = getattr(meta, attr, None)
        if value is not None:
            return f"{symbol} {value}"
    return repr(meta)


def metrics_page() -> str:
    """Markdown for every metric of both exporters."""
    lines = ["# Prometheus metrics reference", "", "Generated from the exporters' metric objects.", ""]
    exporters = (
        ("fed-server start --metrics-port", ServerMetrics(CollectorRegistry())),
        ("fed-client join --metrics-port", SiteMetrics(CollectorRegistry(), "site", "cpu")),
    )
    for where, exporter in exporters:
        lines += [f"## `{where}`", "", "| metric | type | labels | what |", "| --- | --- | --- | --- |"]
        for metric in sorted(_metrics(exporter), key=lambda m: m._name):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            labels = ", ".join(f"`{label}`" for label in metric._labelnames)
            lines.append(f"| `{name}` | {metric._type} | {labels} | {_cell(metric._documentation)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _metrics(exporter: object) -> list[MetricWrapperBase]:
    return [v for v in vars(exporter).values() if isinstance(v, MetricWrapperBase)]


def write_reference(out: Path) -> list[Path]:
    """Write the three pages into ``out`` (created) and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    pages = {"cli.md": cli_page(), "config.md": config_page(), "metrics.md": metrics_page()}
    for name, text in pages.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in pages]


if __name__ == "__main__":
    for written in write_reference(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/reference")):
        sys.stdout.write(f"wrote {written}\n")
