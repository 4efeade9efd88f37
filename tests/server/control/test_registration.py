"""Site keys and a persisted SuperLink database: a restart keeps node ids, a removed site's key is unregistered.

With ``database`` set, the SuperLink keeps the keys of its previous start and refuses to register one twice
("Public key already in use"); before fedseg kept a record beside the database, ``fed-server start --resume``
failed there. The real SuperLink is restarted on the same database three times.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.client.keys import make_site_key
from fedseg.common.errors import ConfigError, FedsegError
from fedseg.common.runtime.flwrctl import FlowerControl
from fedseg.common.runtime.processes import Supervisor, free_port
from fedseg.server.config import ServerConfig, TLSConfig
from fedseg.server.control.certs import make_certificates
from fedseg.server.control.launch import start_server
from fedseg.server.control.registration import read_record, record_path, register_sites
from fedseg.server.control.sites import NODE_SITES_FILE, Site, add_site, read_sites, remove_site


def _config(tmp: Path, run: str) -> ServerConfig:
    certs = tmp / "certs"
    if not certs.exists():
        make_certificates(certs, ["127.0.0.1"])
    tls = TLSConfig(ca=certs / "ca.crt", cert=certs / "server.pem", key=certs / "server.key")
    return ServerConfig(
        port=free_port(),
        output_dir=tmp / run,
        tls=tls,
        sites_file=tmp / "sites.toml",
        supernode_auth=True,
        database=tmp / "state.db",
    )


def _start(tmp: Path, run: str) -> tuple[dict[int, str], set[int]]:
    """Start the server on the shared database; return node id -> site and the SuperLink's registered ids."""
    with Supervisor() as sup:
        server = start_server(sup, _config(tmp, run))
        nodes = {int(k): v for k, v in json.loads((server.private_dir / NODE_SITES_FILE).read_text()).items()}
        live = server.control.registered_nodes()
    return nodes, live


@pytest.mark.slow
def test_restart_on_a_persisted_database_keeps_ids_and_drops_removed_sites(tmp_path: Path) -> None:
    for name in ("a", "b"):
        make_site_key(tmp_path / name)
        add_site(tmp_path / "sites.toml", name, tmp_path / name / "site-key.pub")
    first, live = _start(tmp_path, "run-1")
    assert sorted(first.values()) == ["a", "b"] and set(first) <= live
    assert (tmp_path / "state.db").exists(), "the SuperLink wrote no database: the attack cannot fire"

    second, live = _start(tmp_path, "run-2")  # failed with "Public key already in use" without the record
    assert second == first and set(second) <= live

    remove_site(tmp_path / "sites.toml", "b")
    make_site_key(tmp_path / "a2")
    remove_site(tmp_path / "sites.toml", "a")
    add_site(tmp_path / "sites.toml", "a", tmp_path / "a2" / "site-key.pub")  # a's key rotated
    third, live = _start(tmp_path, "run-3")
    old = {v: k for k, v in first.items()}
    assert list(third.values()) == ["a"] and old["a"] not in third
    assert old["b"] not in live, "the removed site's key is still registered"
    assert old["a"] not in live, "the rotated-out key is still registered"
    assert set(third) <= live
    assert read_record(record_path(tmp_path / "state.db"))["a"].key == read_sites(tmp_path / "sites.toml")[0].key


class _Refusing(FlowerControl):
    """A SuperLink whose database already holds every key (a record-less database from an older fedseg)."""

    def __init__(self) -> None:
        pass

    def registered_nodes(self) -> set[int]:
        return {7}

    def register_node(self, public_key: Path, name: str) -> int:
        raise FedsegError("'flwr supernode' failed: [code: 23] Public key already in use")


def test_a_key_the_database_holds_without_a_record_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"")
    site = Site(name="a", key="ecdsa-sha2-nistp384 AAAA")
    with pytest.raises(FedsegError, match="already holds the key of site a but fedseg has no record"):
        register_sites(_Refusing(), [site], tmp_path / "private", tmp_path / "state.db")


def test_a_broken_record_is_a_config_error(tmp_path: Path) -> None:
    record_path(tmp_path / "state.db").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a fedseg node record"):
        read_record(record_path(tmp_path / "state.db"))
