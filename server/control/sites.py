"""The allow-list of known sites: ``sites.toml`` maps a site name to its SuperNode public key and, optionally, the
number of training cases the operator agreed with that site out of band (``cases = N``): a reply of that site
declaring more is rejected, and its aggregation weight is the pin (:mod:`fedseg.server.run.weighting`)::

    [sites.hospital-a]
    key = "ecdsa-sha2-nistp384 AAAA..."
    cases = 42

``fed-server sites add NAME KEY.pub [--cases N]`` / ``list`` / ``remove NAME`` edit the file (an operator-side
file, never reachable through the network). ``fed-server start`` with node authentication registers every key with the
SuperLink over loopback before the run (:mod:`fedseg.server.control.registration`) and writes ``node-sites.json``
(node id -> site name) into the run's private folder, so the ServerApp knows which site each node id belongs to.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from fedseg.common.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: node id -> site name, written by ``fed-server start`` into ``<output_dir>/.fedseg``.
NODE_SITES_FILE = "node-sites.json"


@dataclass(frozen=True)
class Site:
    """One allowed site: its name, its OpenSSH-format ECDSA public key (one line) and its pinned cases (or None)."""

    name: str
    key: str
    cases: int | None = None


def check_public_key(text: str, source: str) -> str:
    """The key line, if it is an OpenSSH ECDSA public key on a NIST curve (what Flower's node auth accepts).

    Raises:
        ConfigError: anything else (ed25519, RSA, a private key, garbage).
    """
    line = text.strip()
    try:
        key = load_ssh_public_key(line.encode())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm):
        raise ConfigError(f"{source} is not an OpenSSH public key; make one with `fed-client keygen`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{source} is not an ECDSA key (Flower's node authentication needs ECDSA P-256/384/521)")
    return " ".join(line.split()[:2])


def read_sites(path: Path) -> list[Site]:
    """The sites in ``path`` (none when it does not exist).

    Raises:
        ConfigError: the file is not valid TOML or a key is invalid.
    """
    if not path.is_file():
        return []
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML ({err})") from None
    sites = raw.get("sites", {})
    return [
        Site(
            name,
            check_public_key(str(entry.get("key", "")), f"{path} [sites.{name}]"),
            _pinned_cases(entry.get("cases"), f"{path} [sites.{name}] cases"),
        )
        for name, entry in sites.items()
    ]


def _pinned_cases(value: object, source: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{source} must be a positive integer, got {value!r}")
    return value


def case_pins(sites: list[Site]) -> dict[str, int]:
    """Site name -> pinned cases, for the sites that have a pin."""
    return {s.name: s.cases for s in sites if s.cases is not None}


def _write(path: Path, sites: list[Site]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {s.name: {"key": s.key} | ({"cases": s.cases} if s.cases is not None else {}) for s in sites}
    path.write_text(tomli_w.dumps({"sites": table}), encoding="utf-8")


def add_site(path: Path, name: str, public_key: Path, cases: int | None = None) -> Site:
    """Allow site ``name`` with the key in ``public_key`` (and ``cases`` pinned, when given).

    Raises:
        ConfigError: bad name or case count, unreadable or invalid key, name or key already listed.
    """
    if not _NAME.match(name):
        raise ConfigError(f"site name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)")
    _pinned_cases(cases, "--cases")
    if not public_key.is_file():
        raise ConfigError(f"{public_key} does not exist")
    key = check_public_key(public_key.read_text(encoding="utf-8", errors="replace"), str(public_key))
    sites = read_sites(path)
    for site in sites:
        if site.name == name:
            raise ConfigError(f"site {name} is already listed; remove it first to change its key")
        if site.key == key:
            raise ConfigError(f"this key is already listed for site {site.name}")
    site = Site(name, key, cases)
    _write(path, [*sites, site])
    return site


def remove_site(path: Path, name: str) -> None:
    """Remove site ``name``.

    Raises:
        ConfigError: it is not listed.
    """
    sites = read_sites(path)
    if name not in {s.name for s in sites}:
        raise ConfigError(f"site {name} is not in {path}")
    _write(path, [s for s in sites if s.name != name])


def read_node_sites(private: Path) -> dict[int, str]:
    """The node id -> site name map that :func:`register_sites` wrote into ``private`` (empty when there is none).

    Raises:
        ConfigError: the file exists but is not such a map.
    """
    path = private / NODE_SITES_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {int(node): str(name) for node, name in raw.items()}
    except (ValueError, AttributeError) as err:
        raise ConfigError(f"{path} is not a node id -> site name map ({err})") from None
