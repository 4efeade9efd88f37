"""`fed-server certs` writes private keys readable by the owner only, whatever was there before."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedseg.server.control.certs import make_certificates


def test_force_replaces_a_world_readable_key_with_a_0600_one(tmp_path: Path) -> None:
    make_certificates(tmp_path, ["127.0.0.1"])
    for name in ("ca.key", "server.key"):
        (tmp_path / name).chmod(0o644)  # an old key someone made readable
    old = (tmp_path / "server.key").read_bytes()
    files = make_certificates(tmp_path, ["127.0.0.1"], force=True)
    for key in (files.ca_key, files.key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    assert files.key.read_bytes() != old  # the attack fired on a real replacement, not a skipped write


def test_a_link_planted_at_the_key_path_is_not_followed(tmp_path: Path) -> None:
    make_certificates(tmp_path, ["127.0.0.1"])
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a key\n")
    (tmp_path / "server.key").unlink()
    (tmp_path / "server.key").symlink_to(target)
    make_certificates(tmp_path, ["127.0.0.1"], force=True)
    assert target.read_text() == "not a key\n"
    assert not (tmp_path / "server.key").is_symlink()
