"""The site allow-list: keys checked on the way in, names unique, file round-trips; CLI prints one line each."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from fedseg.client.keys import make_site_key
from fedseg.common.errors import ConfigError
from fedseg.server.cli.main import app
from fedseg.server.control.sites import add_site, case_pins, read_sites, remove_site

runner = CliRunner()


def test_add_list_remove_round_trip(tmp_path: Path) -> None:
    _, pub_a = make_site_key(tmp_path / "a")
    _, pub_b = make_site_key(tmp_path / "b")
    sites = tmp_path / "sites.toml"
    add_site(sites, "hospital-a", pub_a)
    add_site(sites, "hospital-b", pub_b)
    listed = read_sites(sites)
    assert [s.name for s in listed] == ["hospital-a", "hospital-b"]
    assert listed[0].key == " ".join(pub_a.read_text().split()[:2])
    remove_site(sites, "hospital-a")
    assert [s.name for s in read_sites(sites)] == ["hospital-b"]


def test_duplicates_bad_names_and_wrong_key_types_are_refused(tmp_path: Path) -> None:
    _, pub = make_site_key(tmp_path / "a")
    sites = tmp_path / "sites.toml"
    add_site(sites, "a", pub)
    with pytest.raises(ConfigError, match="site a is already listed"):
        add_site(sites, "a", pub)
    with pytest.raises(ConfigError, match="this key is already listed for site a"):
        add_site(sites, "b", pub)
    with pytest.raises(ConfigError, match="site name 'x y'"):
        add_site(sites, "x y", pub)
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ConfigError, match="is not an ECDSA key"):
        add_site(sites, "c", ed)
    with pytest.raises(ConfigError, match="is not an OpenSSH public key"):
        add_site(sites, "d", tmp_path / "a" / "site-key")  # the private key by mistake
    with pytest.raises(ConfigError, match="site zz is not in"):
        remove_site(sites, "zz")


def test_sites_cli(tmp_path: Path) -> None:
    _, pub = make_site_key(tmp_path / "a")
    file = str(tmp_path / "sites.toml")
    assert runner.invoke(app, ["sites", "add", "hospital-a", str(pub), "--file", file]).exit_code == 0
    listed = runner.invoke(app, ["sites", "list", "--file", file])
    assert listed.exit_code == 0 and "hospital-a  ecdsa-sha2-nistp384" in listed.output
    again = runner.invoke(app, ["sites", "add", "hospital-a", str(pub), "--file", file])
    assert again.exit_code == 1 and "error: site hospital-a is already listed" in again.output
    assert runner.invoke(app, ["sites", "remove", "hospital-a", "--file", file]).exit_code == 0
    assert "no site allowed" in runner.invoke(app, ["sites", "list", "--file", file]).output


def test_case_pins_round_trip_and_bad_pins_are_one_line_errors(tmp_path: Path) -> None:
    _, pub_a = make_site_key(tmp_path / "a")
    _, pub_b = make_site_key(tmp_path / "b")
    sites = tmp_path / "sites.toml"
    add_site(sites, "hospital-a", pub_a, cases=42)
    add_site(sites, "hospital-b", pub_b)
    assert case_pins(read_sites(sites)) == {"hospital-a": 42}
    assert "cases = 42" in sites.read_text()
    with pytest.raises(ConfigError, match="--cases must be a positive integer, got 0"):
        add_site(sites, "c", pub_b, cases=0)
    sites.write_text(sites.read_text().replace("cases = 42", 'cases = "many"'))
    with pytest.raises(ConfigError, match=r"\[sites.hospital-a\] cases must be a positive integer, got 'many'"):
        read_sites(sites)


def test_sites_cli_pins_cases(tmp_path: Path) -> None:
    _, pub = make_site_key(tmp_path / "a")
    file = str(tmp_path / "sites.toml")
    added = runner.invoke(app, ["sites", "add", "hospital-a", str(pub), "--cases", "30", "--file", file])
    assert added.exit_code == 0 and "30 cases pinned" in " ".join(added.output.split())
    assert "cases=30" in runner.invoke(app, ["sites", "list", "--file", file]).output
