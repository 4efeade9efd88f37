"""What a site trusts to run: the fedseg Flower App of the installed version, plus hashes the site admin adds.

A Flower run is identified by its FAB hash (SHA-256 of the app archive that ``flwr run`` builds; Flower builds it
with fixed timestamps, so the same files give the same hash). fedseg ships a "thin" FAB holding only a
``pyproject.toml`` whose components point at the installed package, so the site computes the hash of that FAB
from its own installation and accepts exactly that one (and any ``fed-client join --trust-app HASH``).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from fedseg.common.errors import ConfigError

_HASH = re.compile(r"^[0-9a-f]{64}$")


def fedseg_fab_hash() -> str:
    """The FAB hash of the fedseg app this installation would submit (``fed-server start`` stages the same file)."""
    from flwr.cli.build import build_fab_from_disk  # heavy import, only where the hash is needed

    # a package-data file of fedseg.server, read as a resource (the client never imports server code)
    source = resources.files("fedseg.server").joinpath("flwr_app", "pyproject.toml").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="fedseg-fab-") as folder:
        (Path(folder) / "pyproject.toml").write_text(source, encoding="utf-8")
        return hashlib.sha256(build_fab_from_disk(Path(folder))).hexdigest()


def parse_trusted(extra: Iterable[str]) -> frozenset[str]:
    """Hashes a site admin trusts in addition to the installed fedseg app (lower-case SHA-256 hex).

    Raises:
        ConfigError: a value is not a 64-digit hex SHA-256.
    """
    hashes = set()
    for value in extra:
        value = value.strip().lower()
        if not _HASH.match(value):
            raise ConfigError(f"--trust-app {value!r} is not a FAB hash (64 hex digits, as `flwr ls` shows it)")
        hashes.add(value)
    return frozenset(hashes)


def refusal(run_id: int, fab_hash: str, trusted: frozenset[str]) -> str | None:
    """Why the run must not execute here, or None when its app is trusted."""
    if not fab_hash:
        return f"run {run_id} refused: it names no app hash, so it cannot be checked"
    if fab_hash not in trusted:
        return (
            f"run {run_id} refused: its app (FAB hash {fab_hash[:12]}…) is not the installed fedseg app "
            "nor one trusted with --trust-app"
        )
    return None
