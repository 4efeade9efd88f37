"""Our Flower ServerApp (``fedseg.server.app:app``): read the RunSpec from run_config, then run the rounds.

It runs in its own ``flwr-serverapp`` process started by the SuperLink, so it reads everything from the
``config-json`` run-config key that ``fed-server start`` fills in, and logs to ``<output_dir>/logs/serverapp.log``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from pydantic import ValidationError

from fedseg.common.errors import ConfigError, format_validation_error
from fedseg.common.runtime.applog import detach, log_to_file
from fedseg.server.config import RUN_CONFIG_KEY, RunSpec
from fedseg.server.control.runs import PRIVATE_DIR, SPEC_ENV
from fedseg.server.control.sites import case_pins, read_node_sites, read_sites
from fedseg.server.run.loop import serve

log = logging.getLogger(__name__)

LOG_FILE = Path("logs") / "serverapp.log"
#: Written by the ServerApp when it returns or fails, so ``fed-server`` asks Flower for the final status at once.
EXIT_MARKER = Path(PRIVATE_DIR) / "serverapp.exit"

app = ServerApp()


def run_spec(run_config: Mapping[str, object]) -> RunSpec:
    """Decode the RunSpec that ``fed-server start`` put into the run config.

    Raises:
        ConfigError: the key is missing, empty or invalid.
    """
    raw = run_config.get(RUN_CONFIG_KEY)
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"run config '{RUN_CONFIG_KEY}' is empty; submit fedseg runs with `fed-server start`")
    try:
        return RunSpec.model_validate_json(raw)
    except ValidationError as err:
        raise ConfigError(f"run config '{RUN_CONFIG_KEY}': {format_validation_error(err)}") from None


def trusted_spec(run_config: Mapping[str, object], environ: Mapping[str, str]) -> RunSpec:
    """The RunSpec of this run, accepted only if it is exactly the one ``fed-server start`` wrote.

    ``fed-server start`` writes the spec into its run folder and names that file in :data:`SPEC_ENV` in the
    SuperLink's environment (inherited by this process, out of reach of a run request). A run submitted with any
    other ``config-json`` (another output folder, other rounds, ...) is refused before anything is written.

    Raises:
        ConfigError: no spec file named, unreadable, or the submitted run config differs from it.
    """
    named = environ.get(SPEC_ENV, "")
    if not named:
        raise ConfigError(f"{SPEC_ENV} is not set: fedseg runs are started by `fed-server start` only")
    try:
        written = Path(named).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read the run spec {named}: {err.strerror}") from None
    if run_config.get(RUN_CONFIG_KEY) != written:
        raise ConfigError(
            f"run config '{RUN_CONFIG_KEY}' differs from the spec fed-server start wrote ({named}); run refused"
        )
    return run_spec({RUN_CONFIG_KEY: written})


def registered_sites(spec: RunSpec, environ: Mapping[str, str]) -> dict[int, str]:
    """Node id -> site name of the keys ``fed-server start`` registered (empty without node authentication).

    The map lies next to the spec file (the run's private folder, see :data:`SPEC_ENV`).

    Raises:
        ConfigError: node authentication is on but the map is missing or unreadable.
    """
    if not spec.config.node_auth:
        return {}
    nodes = read_node_sites(Path(environ[SPEC_ENV]).parent)
    if not nodes:
        raise ConfigError("node authentication is on but fed-server start registered no site; run refused")
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point called by Flower in the ServerApp process."""
    spec = trusted_spec(context.run_config, os.environ)
    registered = registered_sites(spec, os.environ)
    out = spec.config.output_dir
    handler = log_to_file(out / LOG_FILE)
    outcome = "failed"
    try:
        serve(grid, spec, registered, case_pins(read_sites(spec.config.sites_file)))
        outcome = "completed"
    except Exception:
        log.exception("the ServerApp failed")
        raise
    finally:
        (out / EXIT_MARKER).parent.mkdir(parents=True, exist_ok=True)
        (out / EXIT_MARKER).write_text(outcome + "\n", encoding="utf-8")
        detach(handler)
