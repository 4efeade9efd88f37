"""The site of a ClientApp on Flower's simulation runtime (``fed-server simulate``).

A simulated SuperNode has no ``fed-client join`` node-config, only ``partition-id`` and ``num-partitions``.
``fed-server simulate`` writes one node-config file per virtual site under a folder it names in the run-config
key :data:`SIM_SITES_KEY`; partition ``k`` reads ``<folder>/site-<k+1>/node-config.toml``. A real SuperNode's
node-config is used as is, so a deployed site never looks at the run config for its site.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path

from fedseg.client.site import NODE_CONFIG_FILE, SiteConfig, site_from_node_config
from fedseg.common.errors import ConfigError

#: Run-config key: the folder holding the simulated sites' node-config files ('' outside simulations).
SIM_SITES_KEY = "sim-sites"
#: Node-config key Flower's simulation runtime gives each virtual SuperNode (0-based).
PARTITION_KEY = "partition-id"


def simulated_site_dir(root: Path, partition: int) -> Path:
    """The folder of virtual site ``partition`` (0-based) of a simulation rooted at ``root``."""
    return root / f"site-{partition + 1}"


def site_for(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> SiteConfig:
    """This ClientApp's site: its node-config, or on the simulation runtime its partition's node-config file.

    Raises:
        ConfigError: neither a site node-config nor a simulated site's file is there.
    """
    root = run_config.get(SIM_SITES_KEY, "")
    partition = node_config.get(PARTITION_KEY)
    if "site" in node_config or partition is None or not isinstance(root, str) or not root:
        return site_from_node_config(node_config)
    path = simulated_site_dir(Path(root), int(str(partition))) / NODE_CONFIG_FILE
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"simulated site {partition}: cannot read {path} ({err})") from None
    return site_from_node_config(values)
