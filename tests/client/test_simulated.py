"""A simulated ClientApp finds its virtual site from its partition; a real SuperNode's node-config wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.client.simulated import SIM_SITES_KEY, site_for
from fedseg.common.errors import ConfigError
from fedseg.server.control.simulate import write_sim_sites


def test_partition_k_is_site_k_plus_one(tmp_path: Path) -> None:
    root = write_sim_sites(tmp_path / "sites", tmp_path / "data", 3)
    run_config = {SIM_SITES_KEY: str(root)}
    for partition in range(3):
        site = site_for({"partition-id": partition, "num-partitions": 3}, run_config)
        assert site.site == f"site-{partition + 1}"
        assert site.data == tmp_path / "data" / f"site-{partition + 1}"
        assert site.workdir == root / f"site-{partition + 1}"


def test_a_deployed_node_config_is_used_as_is(tmp_path: Path) -> None:
    node = {"site": "hospital-a", "data": str(tmp_path), "workdir": str(tmp_path / "w")}
    assert site_for(node, {SIM_SITES_KEY: str(tmp_path / "elsewhere")}).site == "hospital-a"
    assert site_for(node, {}).site == "hospital-a"


def test_a_partition_without_its_file_is_one_clear_error(tmp_path: Path) -> None:
    write_sim_sites(tmp_path / "sites", tmp_path / "data", 2)
    with pytest.raises(ConfigError, match=r"simulated site 5: cannot read .*site-6"):
        site_for({"partition-id": 5}, {SIM_SITES_KEY: str(tmp_path / "sites")})


def test_without_the_simulation_key_a_partition_is_not_a_site(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fed-client join"):
        site_for({"partition-id": 0}, {SIM_SITES_KEY: ""})
