"""`fed-server start`: run a federation from a server.toml (or continue one with --resume)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Annotated

import typer
from rich.markup import escape

from fedseg.common.cli.shell import guarded
from fedseg.common.console import console
from fedseg.common.engine.device import resolve_device
from fedseg.common.errors import ConfigError
from fedseg.common.runtime.processes import Supervisor
from fedseg.server.cli.live import LiveRounds, summary_lines
from fedseg.server.config import RunSpec
from fedseg.server.configfile import load_server_config
from fedseg.server.control.launch import claim, run_to_end, start_server
from fedseg.server.control.monitor import monitored
from fedseg.server.control.report import write_report
from fedseg.server.control.runs import new_spec, resume_spec


def run_spec_for(config: Path | None, resume: Path | None, overrides: list[str]) -> tuple[RunSpec, IO[str]]:
    """The run that ``start`` should execute (a new one from ``config``, or the continuation of ``resume``) and
    the lock on its output folder, taken (:func:`claim`) before the folder is judged or written: a second start on
    a running server's folder is told so, not that the folder "already holds a run".

    Raises:
        ConfigError: both or an invalid value were given, or validation.device is not on this machine.
        FedsegError: another fed-server runs in the output folder, or a port is in use.
    """
    if config is not None and resume is not None:
        raise ConfigError("pass either --config (new run) or --resume RUN_DIR (continue a run), not both")
    resumed = resume_spec(resume, overrides) if resume is not None else None
    cfg = resumed.config if resumed is not None else load_server_config(config, overrides)
    if cfg.validation.data is not None:
        resolve_device(cfg.validation.device, "validation.device")
    lock = claim(cfg)
    try:
        return resumed or new_spec(cfg), lock
    except BaseException:
        lock.close()
        raise


def run_and_report(spec: RunSpec, lock: IO[str]) -> None:
    """Start the SuperLink, run ``spec`` to the end with a live table, stop everything, print a summary; ``lock``
    (from :func:`run_spec_for`) is released once every process has stopped."""
    cfg = spec.config
    with lock, Supervisor() as sup:
        server = start_server(sup, cfg, lock)
        ca = f" --root-certificates {cfg.tls.ca.name}" if cfg.tls is not None else ""
        console.print(
            f"Fleet API (only) on [bold]{escape(cfg.address)}[/], control on loopback; sites join with "
            f"`fed-client join --server {escape(cfg.address)}{escape(ca)} --site NAME --data DIR`"
        )
        with LiveRounds() as live, monitored(cfg, [live.on_event], [live.tick]):
            run_id, status = run_to_end(server, spec, live.add)
    for line in summary_lines(live.rows):
        console.print(line)
    out = escape(str(spec.config.output_dir))
    console.print(f"run {run_id} {status.outcome} in {status.elapsed:.0f} s; results in [bold]{out}[/]")
    if (spec.config.output_dir / "history.json").is_file():
        console.print(f"report: [bold]{escape(str(write_report(spec.config.output_dir)))}[/]")


@guarded
def start_command(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Config overrides key=value, e.g. rounds=5 train.lr=1e-4 strategy.name=fedprox."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Server config (TOML).")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this output folder from its last round.")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port", min=1, max=65535, help="Serve Prometheus /metrics here (same as metrics.port=N)."
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow plain HTTP on a non-loopback host (same as insecure=true).")
    ] = False,
) -> None:
    """Start a SuperLink, run the federation to the end, then stop every process.

    OVERRIDES are server.toml keys as key=value (dots for tables), applied after the file: rounds=5,
    min_sites=1, train.steps=50, strategy.name=fedprox, validation.data=data/validation, metrics.port=9300.
    Relative paths are relative to the --config file (else to the working directory).
    """
    extra = [f"metrics.port={metrics_port}"] if metrics_port is not None else []
    if insecure:
        extra.append("insecure=true")
    run_and_report(*run_spec_for(config, resume, [*(overrides or []), *extra]))
