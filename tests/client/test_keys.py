"""`fed-client keygen`: an OpenSSH ECDSA P-384 key pair, private key 0600, never overwritten."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fedseg.client.cli.main import app
from fedseg.client.keys import make_site_key
from fedseg.common.errors import ConfigError

runner = CliRunner()


def test_keygen_makes_a_matching_p384_pair(tmp_path: Path) -> None:
    private, public = make_site_key(tmp_path, "hospital-a")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()) == key.public_key()
    assert public.read_text().endswith(" hospital-a\n")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="never overwritten"):
        make_site_key(tmp_path)


def test_keygen_cli_names_the_file_to_send(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keygen", "--out", str(tmp_path), "--site", "a"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "site-key.pub") in result.output.replace("\n", "")
