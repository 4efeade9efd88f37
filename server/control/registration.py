"""Register the allowed sites' keys with the SuperLink, also when its ``--database`` already holds them.

An in-memory SuperLink starts empty: every key is registered afresh. A SuperLink with a persisted database
(``database`` in server.toml) still holds the keys of its previous start, and Flower refuses to register a key
twice ("Public key already in use"), so ``fed-server start --resume`` needs the node id each key got. Flower's
node list gives ids and status but neither key nor name, so fedseg keeps its own record beside the database
(``<database>.fedseg-nodes.json``: site -> node id and key) and reconciles it with the SuperLink at each start:

* a site whose recorded key is unchanged and whose node is still registered keeps its node id;
* a site whose key changed (``sites remove`` + ``sites add``) has its old node unregistered, then the new key
  registered;
* a recorded site no longer in ``sites.toml`` is unregistered: a removed site's key cannot reconnect;
* a key the database holds that the record does not know cannot be matched to a node: a one-line error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fedseg.common.errors import ConfigError, FedsegError
from fedseg.common.runtime.flwrctl import FlowerControl
from fedseg.server.control.sites import NODE_SITES_FILE, Site

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".fedseg-nodes.json"
_IN_USE = "already in use"


@dataclass(frozen=True)
class Registered:
    """One site's registration as recorded beside the database."""

    node_id: int
    key: str


def record_path(database: Path) -> Path:
    """Where fedseg records the registrations held by ``database``."""
    return database.with_name(database.name + RECORD_SUFFIX)


def read_record(path: Path) -> dict[str, Registered]:
    """The recorded registrations (empty when there is no record).

    Raises:
        ConfigError: the file exists but is not such a record.
    """
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {str(name): Registered(int(entry["node_id"]), str(entry["key"])) for name, entry in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} is not a fedseg node record ({err}); remove it together with the database") from None


def write_record(path: Path, record: dict[str, Registered]) -> None:
    """Write the registrations (atomically: a crash leaves the old record or the new one)."""
    raw = {name: {"node_id": reg.node_id, "key": reg.key} for name, reg in sorted(record.items())}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _register(control: FlowerControl, site: Site, keys: Path, database: Path | None) -> int:
    key_file = keys / f"{site.name}.pub"
    key_file.write_text(site.key + "\n", encoding="utf-8")
    try:
        return control.register_node(key_file, site.name)
    except FedsegError as err:
        if _IN_USE not in str(err).lower():
            raise
        where = f"the SuperLink database {database}" if database is not None else "the SuperLink"
        raise FedsegError(
            f"{where} already holds the key of site {site.name} but fedseg has no record of its node id "
            f"({record_path(database) if database is not None else 'no database'}); start with a new database"
        ) from None


def reconcile(control: FlowerControl, sites: list[Site], keys: Path, database: Path | None) -> dict[str, int]:
    """Make the SuperLink's registered keys exactly ``sites``; return site name -> node id (see module doc)."""
    record_file = None if database is None else record_path(database)
    fresh = database is None or not database.exists()  # a record beside a deleted database names nothing
    record = {} if fresh or record_file is None else read_record(record_file)
    live = control.registered_nodes() if record else set()
    allowed = {site.name: site for site in sites}
    for name, reg in record.items():
        site = allowed.get(name)
        if reg.node_id in live and (site is None or site.key != reg.key):
            log.info("unregistering node %d (site %s: %s)", reg.node_id, name, "removed" if site is None else "new key")
            control.unregister_node(reg.node_id)
    kept: dict[str, Registered] = {}
    for site in sites:
        known = record.get(site.name)
        if known is not None and known.key == site.key and known.node_id in live:
            kept[site.name] = known
        else:
            kept[site.name] = Registered(_register(control, site, keys, database), site.key)
        if record_file is not None:
            write_record(record_file, kept)  # after each key: a crash mid-way still knows what it registered
    return {name: reg.node_id for name, reg in kept.items()}


def register_sites(
    control: FlowerControl, sites: list[Site], private: Path, database: Path | None = None
) -> dict[int, str]:
    """Register every site's key with the SuperLink (loopback Control API); write and return node id -> name.

    Args:
        control: the SuperLink's Control API client.
        sites: the allow-list.
        private: the run's private folder (``node-sites.json`` and the key files go there).
        database: the SuperLink's ``--database`` (None: in memory, nothing is kept between starts).

    Raises:
        FedsegError: no site is allowed, or the SuperLink refused a key.
    """
    if not sites:
        raise FedsegError("node authentication is on but no site is allowed; add one with `fed-server sites add`")
    keys = private / "site-keys"
    keys.mkdir(parents=True, exist_ok=True)
    nodes = {node: name for name, node in reconcile(control, sites, keys, database).items()}
    (private / NODE_SITES_FILE).write_text(json.dumps({str(k): v for k, v in nodes.items()}, indent=2) + "\n")
    return nodes
