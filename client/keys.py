"""A site's SuperNode key: ECDSA P-384 in OpenSSH format (what Flower's node authentication accepts).

The private key stays at the site (``fed-client join --auth-key``); the ``.pub`` file goes to the server operator,
who allows it with ``fed-server sites add NAME site.pub``. Both files are created new and exclusively
(:func:`create_new`): never an existing file (whose permissions a private key would inherit) and never through a
link planted at their path.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedseg.common.errors import ConfigError

KEY_NAME = "site-key"


def create_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to a file created at ``path`` by this call, with ``mode`` (not following a link there).

    Raises:
        FileExistsError: anything, a dangling link included, is already at ``path``.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_site_key(out: Path, comment: str = "") -> tuple[Path, Path]:
    """Write ``out/site-key`` (mode 0600) and ``out/site-key.pub``; return both paths.

    Raises:
        ConfigError: something (a key, a link) already is at either path (never overwritten).
    """
    private, public = out / KEY_NAME, out / f"{KEY_NAME}.pub"
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    try:
        create_new(private, data)
    except FileExistsError:
        raise ConfigError(f"{private} already exists; a site key is never overwritten (remove it first)") from None
    try:
        create_new(public, line + (f" {comment}".encode() if comment else b"") + b"\n", 0o644)
    except FileExistsError:
        private.unlink()  # no half pair left behind
        raise ConfigError(f"{public} already exists; a site key is never overwritten (remove it first)") from None
    return private, public
