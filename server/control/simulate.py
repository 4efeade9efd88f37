"""``fed-server simulate``: many virtual phantom sites on Flower's simulation runtime (Ray), in one process.

The same ServerApp (``fedseg.server.app:app``) and ClientApp (``fedseg.client.app:app``) as a deployment run; only
the transport differs: Flower's simulation engine gives each virtual SuperNode a ``partition-id`` and
:mod:`fedseg.client.simulated` turns it into the site's node-config, written here per site. Ray keeps one worker
process per actor, so a ClientApp's imports are paid once per actor, not once per message.

Layout under ``--out``: ``data/`` phantoms (site-1..N, validation), ``sites/site-k`` each virtual site's workdir
(node-config, cache, logs), ``run/`` the server's output folder, ``.fedseg/`` the staged app and run spec.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedseg.client.simulated import SIM_SITES_KEY, simulated_site_dir
from fedseg.client.site import NODE_CONFIG_FILE, SiteConfig, write_node_config
from fedseg.common.errors import ConfigError
from fedseg.common.runtime.flwrctl import flower_env
from fedseg.server.config import RUN_CONFIG_KEY, RunSpec
from fedseg.server.control.demo import DemoOptions, demo_config, ensure_phantoms, fresh_run_dir
from fedseg.server.control.runs import PRIVATE_DIR, SPEC_ENV, SPEC_FILE, new_spec, save_config, stage_app, write_spec

#: One line when the extra is missing.
RAY_HINT = 'Flower\'s simulation runtime needs Ray: pip install "fedseg[simulation]"'


@dataclass(frozen=True)
class SimOptions:
    """What ``fed-server simulate`` runs.

    Attributes:
        out: root folder (see the module docstring).
        sites: virtual sites (Flower SuperNodes), one phantom dataset each.
        rounds: federated rounds.
        size: phantom grid (D, H, W) at 2 mm.
        cases_per_site: phantom cases per site.
        cpus_per_site: CPU cores Ray reserves per virtual site (how many train at once).
        overrides: extra ``key=value`` server-config overrides.
    """

    out: Path
    sites: int = 10
    rounds: int = 3
    size: tuple[int, int, int] = (32, 32, 32)
    cases_per_site: int = 2
    cpus_per_site: float = 1.0
    overrides: tuple[str, ...] = field(default_factory=tuple)


def sim_defaults(size: tuple[int, int, int], sites: int) -> tuple[str, ...]:
    """Overrides of the demo settings for a simulation: patches that fit the phantoms, a round budget for
    ``sites`` sites taking turns on a few cores (the caller's own overrides come after these)."""
    train = [min(size[0], 32), min(size[1], 48), min(size[2], 48)]
    val = [min(n, 48) for n in size]
    budget = 240.0 + 30.0 * sites
    return (f"train.patch_size={train}", f"validation.patch_size={val}", f"round_timeout={budget}",
            f"site_wait_timeout={budget}")  # fmt: skip


def require_ray() -> None:
    """Raises ConfigError with :data:`RAY_HINT` when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(RAY_HINT)


def write_sim_sites(root: Path, data: Path, sites: int) -> Path:
    """One node-config per virtual site: ``<root>/site-k/node-config.toml`` (also that site's workdir)."""
    for partition in range(sites):
        folder = simulated_site_dir(root, partition)
        name = folder.name
        site = SiteConfig(
            site=name, data=data / name, labels=str(data / name / "labels.toml"), workdir=folder, device="cpu"
        )
        write_node_config(site, folder / NODE_CONFIG_FILE)
    return root


def staged_app(folder: Path, run_config: dict[str, str]) -> Path:
    """The thin FAB folder with ``run_config`` as its config defaults (the virtual sites' run config)."""
    app = stage_app(folder)
    project = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    project["tool"]["flwr"]["app"]["config"].update(run_config)
    (app / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return app


def simulate(opts: SimOptions) -> RunSpec:
    """Phantoms and virtual sites, then the whole run on Flower's simulation runtime; returns the run's spec.

    Raises:
        ConfigError: Ray is missing, or the configuration is invalid.
    """
    require_ray()
    demo = DemoOptions(out=opts.out, sites=opts.sites, rounds=opts.rounds, size=opts.size,
                       cases_per_site=opts.cases_per_site, val_cases=1,
                       overrides=(*sim_defaults(opts.size, opts.sites), *opts.overrides))  # fmt: skip
    ensure_phantoms(demo)
    fresh_run_dir(demo.run_dir)
    cfg = demo_config(demo, port=9092)  # no SuperLink listens: the port is only validated
    spec = new_spec(cfg)
    save_config(cfg)
    private = opts.out / PRIVATE_DIR
    os.environ[SPEC_ENV] = str(write_spec(spec, private / SPEC_FILE))  # the ServerApp's check, as with start
    sites = write_sim_sites(opts.out / "sites", demo.data_dir, opts.sites)
    run_config = {RUN_CONFIG_KEY: spec.model_dump_json(), SIM_SITES_KEY: str(sites)}
    os.environ.update(flower_env(private / "flwr-home"))  # quiet Flower, its home inside the run
    _run(staged_app(private / "app", run_config), run_config, opts)
    return spec


def _run(app_dir: Path, run_config: dict[str, str], opts: SimOptions) -> None:
    """Flower's simulation engine with our apps; ``run_config`` reaches the ServerApp and every ClientApp."""
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation  # 1.42's entry taking a ServerApp context
    from flwr.supercore.telemetry import EventType

    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    _run_simulation(
        num_supernodes=opts.sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app_attr="fedseg.client.app:app",  # the components of the thin FAB, loaded as Flower loads them
        server_app_attr="fedseg.server.app:app",
        backend_config={"client_resources": {"num_cpus": opts.cpus_per_site, "num_gpus": 0.0}},
        server_app_context=context,
        app_dir=str(app_dir),
        is_app=True,  # the virtual sites' run config comes from the app folder
    )
