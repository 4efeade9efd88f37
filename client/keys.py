"""A site's SuperNode key: ECDSA P-384 in OpenSSH format (what Flower's node authentication accepts).

The private key stays at the site (``fed-client join --auth-key``); the ``.pub`` file goes to the server operator,
who allows it with ``fed-server sites add NAME site.pub``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedseg.common.errors import ConfigError

KEY_NAME = "site-key"


def make_site_key(out: Path, comment: str = "") -> tuple[Path, Path]:
    """Write ``out/site-key`` (mode 0600) and ``out/site-key.pub``; return both paths.

    Raises:
        ConfigError: a key already exists there (never overwritten).
    """
    private, public = out / KEY_NAME, out / f"{KEY_NAME}.pub"
    if private.exists() or public.exists():
        raise ConfigError(f"{private} already exists; a site key is never overwritten (remove it first)")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + (f" {comment}".encode() if comment else b"") + b"\n")
    return private, public
