"""``fed-server demo``: a whole federation on this machine with phantom sites, in a few minutes on a laptop CPU.

Layout under ``--out``::

    data/site-1 ... data/site-N, data/validation    phantom datasets (generated once, reused)
    sites/site-1 ...                                 each site's workdir (cache, logs)
    run/                                             the server's output folder (history, checkpoints, logs)
    attention/                                       attention-gate maps of the final model (NIfTI + PNG)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.common.data.io import read_volume
from fedseg.common.data.layouts import discover_cases
from fedseg.common.engine.checkpoint import load_checkpoint
from fedseg.common.engine.inference import predict_volume
from fedseg.common.engine.keeper import BEST, LAST
from fedseg.common.errors import ConfigError, DataError
from fedseg.common.eval.attention_export import write_attention
from fedseg.common.runtime.events import Event
from fedseg.common.runtime.processes import Child, Supervisor, free_port
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.config import RunSpec, ServerConfig
from fedseg.server.configfile import build_config, merge, parse_overrides
from fedseg.server.control.launch import Server, run_to_end, start_server
from fedseg.server.control.monitor import monitored
from fedseg.server.control.runs import CONFIG_FILE, new_spec
from fedseg.server.run.history import RoundRow
from fedseg.server.run.loop import CHECKPOINT_DIR

log = logging.getLogger(__name__)

#: Rounds of the demo: with :data:`DEMO_SETTINGS`' 10 steps a round, 180 steps per site. More, shorter rounds at
#: the same 180 steps beat 6 rounds of 30 in both demo draws and in ``bench/payoff.py`` (docs/benchmarks.md).
DEMO_ROUNDS = 18

#: Demo settings sized for ≤ 10 minutes on a 2-core CPU (phantoms 48³ at 2 mm, a 1/16-width network).
DEMO_SETTINGS: dict[str, object] = {
    "round_timeout": 240.0,
    "site_wait_timeout": 240.0,
    "model": {"feature_scale": 16},
    "train": {"steps": 10, "batch_size": 2, "patch_size": [32, 48, 48], "lr": 3e-3, "amp": False},
    "validation": {"patch_size": [48, 48, 48]},
}


@dataclass(frozen=True)
class DemoOptions:
    """What ``fed-server demo`` runs.

    Attributes:
        out: root folder of the demo (see the module docstring).
        sites: number of phantom sites (one ``fed-client join`` each).
        rounds: federated rounds.
        size: phantom grid (D, H, W) at 2 mm.
        cases_per_site: phantom cases per site.
        val_cases: phantom cases of the central validation set.
        overrides: extra ``key=value`` server-config overrides.
    """

    out: Path
    sites: int = 3
    rounds: int = DEMO_ROUNDS
    size: tuple[int, int, int] = (48, 48, 48)
    cases_per_site: int = 3
    val_cases: int = 2
    overrides: Sequence[str] = field(default_factory=tuple)

    @property
    def site_names(self) -> list[str]:
        """``site-1`` ... ``site-N``."""
        return [f"site-{i}" for i in range(1, self.sites + 1)]

    @property
    def data_dir(self) -> Path:
        """Phantom datasets."""
        return self.out / "data"

    @property
    def run_dir(self) -> Path:
        """The server's output folder."""
        return self.out / "run"


def ensure_phantoms(opts: DemoOptions) -> None:
    """Generate the phantom sites and validation set unless they are already there.

    Raises:
        DataError: the data folder exists but lacks a site (generated earlier with fewer sites).
    """
    wanted = [opts.data_dir / name for name in opts.site_names] + [opts.data_dir / "validation"]
    if all((p / "dataset.json").is_file() for p in wanted):
        log.info("reusing phantoms in %s", opts.data_dir)
        return
    if opts.data_dir.exists() and any(opts.data_dir.iterdir()):
        missing = next(p for p in wanted if not (p / "dataset.json").is_file())
        raise DataError(f"{opts.data_dir} lacks {missing.name}; delete {opts.data_dir} or pick another --out")
    generate_phantoms(
        opts.data_dir,
        sites=opts.sites,
        cases_per_site=opts.cases_per_site,
        val_cases=opts.val_cases,
        size=opts.size,
    )


def demo_config(opts: DemoOptions, port: int) -> ServerConfig:
    """The server config of the demo: :data:`DEMO_SETTINGS`, the chosen rounds and port, then the overrides."""
    raw: dict[str, object] = merge(
        DEMO_SETTINGS,
        {
            "rounds": opts.rounds,
            "min_sites": opts.sites,
            "port": port,
            "output_dir": str(opts.run_dir),
            "validation": {"data": str(opts.data_dir / "validation"), "labels": _labels(opts.data_dir / "validation")},
        },
    )
    raw = merge(raw, parse_overrides(opts.overrides))
    return build_config(raw, opts.out.resolve(), "demo settings")


def _labels(dataset: Path) -> str | None:
    manifest = dataset / "labels.toml"
    return str(manifest) if manifest.is_file() else None


def fresh_run_dir(run_dir: Path) -> None:
    """Remove a previous demo run in ``run_dir`` (only if it is one), so the demo always starts at round 1.

    Raises:
        ConfigError: the folder holds something else.
    """
    if not run_dir.exists():
        return
    if not (run_dir / CONFIG_FILE).is_file() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} exists and is not a fed-server run; pick another --out")
    shutil.rmtree(run_dir)


def join_argv(site: str, data: Path, server: str, workdir: Path) -> list[str]:
    """Command line of one ``fed-client join`` (through this interpreter, so no PATH lookup is needed)."""
    return [
        sys.executable,
        "-c",
        "from fedseg.client.cli.main import main; main()",
        "join",
        "--site",
        site,
        "--data",
        str(data),
        "--labels",
        str(data / "labels.toml"),
        "--server",
        server,
        "--workdir",
        str(workdir),
    ]


def start_sites(sup: Supervisor, opts: DemoOptions, server: Server) -> list[Child]:
    """Start one ``fed-client join`` per phantom site, each limited to its share of the CPU cores."""
    threads = max(1, (os.cpu_count() or 1) // opts.sites)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    children = []
    for name in opts.site_names:
        argv = join_argv(name, opts.data_dir / name, server.cfg.address, opts.out / "sites" / name)
        children.append(sup.start(name, argv, env=env, log_path=opts.out / "logs" / f"{name}.log"))
    return children


def write_final_attention(cfg: ServerConfig, out_dir: Path) -> list[Path]:
    """Attention maps and PNG montage of the best (else last) global model on the first validation case."""
    if cfg.model.arch != "attention-unet" or cfg.validation.data is None:
        return []
    folder = cfg.output_dir / CHECKPOINT_DIR
    checkpoint = folder / BEST if (folder / BEST).is_file() else folder / LAST
    if not checkpoint.is_file():
        return []
    model, meta = load_checkpoint(checkpoint)
    case = discover_cases(cfg.validation.data)[0]
    volume = read_volume(case.image)
    result = predict_volume(model, meta, volume, "cpu", attention=True)
    return write_attention(volume, result.attention, out_dir, case.case_id, labels=result.labels.array)


def run_demo(
    opts: DemoOptions,
    on_row: Callable[[RoundRow], None],
    on_event: Sequence[Callable[[Event], None]] = (),
    ticks: Sequence[Callable[[], None]] = (),
) -> RunSpec:
    """Phantoms, SuperLink, one join per site, the run (``on_row`` sees every round), then everything stopped.

    ``on_event`` handlers see the ServerApp's events and ``ticks`` run after each look at them (live progress).

    Returns:
        The run's spec.
    """
    ensure_phantoms(opts)
    fresh_run_dir(opts.run_dir)
    cfg = demo_config(opts, free_port())
    spec = new_spec(cfg)
    with Supervisor() as sup:
        server = start_server(sup, cfg)
        sites = start_sites(sup, opts, server)
        with monitored(cfg, on_event, ticks):
            run_to_end(server, spec, on_row, watch=sites)
    return spec
