"""The server's public side: secure by default, certificates from `fed-server certs`, TLS at the gateway."""

from __future__ import annotations

import os
import ssl
import stat
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from fedseg.common.errors import ConfigError
from fedseg.common.runtime.flwrctl import CONNECTION
from fedseg.common.runtime.processes import Supervisor, free_port
from fedseg.server.cli.main import app
from fedseg.server.config import ServerConfig, TLSConfig
from fedseg.server.control.certs import make_certificates
from fedseg.server.control.front import check_exposure
from fedseg.server.control.launch import Server, start_server

runner = CliRunner()
PUBLIC = "127.0.0.2"


def _tls(folder: Path, *hosts: str) -> TLSConfig:
    files = make_certificates(folder, list(hosts))
    return TLSConfig(ca=files.ca, cert=files.cert, key=files.key)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "fed.example.org", "::"])
def test_plain_http_off_loopback_is_refused_unless_insecure(host: str) -> None:
    with pytest.raises(ConfigError, match=r"refusing to serve .* over plain HTTP: .* pass --insecure"):
        check_exposure(ServerConfig(host=host))
    check_exposure(ServerConfig(host=host, insecure=True))


def test_loopback_and_tls_are_allowed(tmp_path: Path) -> None:
    check_exposure(ServerConfig(host="127.0.0.1"))
    check_exposure(ServerConfig(host="0.0.0.0", tls=_tls(tmp_path, "fed.example.org")))


def test_start_refuses_a_public_plain_http_address_in_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["start", "host=0.0.0.0", f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: refusing to serve 0.0.0.0:9092 over plain HTTP")
    assert not (tmp_path / "run" / "logs").exists()  # nothing was started


def test_certs_have_the_public_and_loopback_names_and_verify_against_the_ca(tmp_path: Path) -> None:
    files = make_certificates(tmp_path, ["fed.example.org", "203.0.113.7"])
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fed.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["203.0.113.7", "127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (files.key, files.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_certs_refuse_to_replace_a_ca_and_need_a_host(tmp_path: Path) -> None:
    make_certificates(tmp_path, ["a"])
    with pytest.raises(ConfigError, match="refusing to replace the CA sites trust"):
        make_certificates(tmp_path, ["a"])
    with pytest.raises(ConfigError, match="pass --host NAME"):
        make_certificates(tmp_path / "other", [" "])


def test_certs_cli_prints_the_one_file_sites_need(tmp_path: Path) -> None:
    result = runner.invoke(app, ["certs", "--out", str(tmp_path), "--host", "fed.example.org"])
    assert result.exit_code == 0, result.output
    assert "give every site only this file" in result.output
    assert str(tmp_path / "ca.crt") in result.output.replace("\n", "")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, ssl.SSLContext]]:
    tmp = tmp_path_factory.mktemp("tls")
    tls = _tls(tmp / "certs", PUBLIC)
    cfg = ServerConfig(host=PUBLIC, port=free_port(PUBLIC), output_dir=tmp / "run", tls=tls)
    with Supervisor() as sup:
        yield start_server(sup, cfg), ssl.create_default_context(cafile=str(tls.ca))


def _post(url: str, context: ssl.SSLContext | None) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2 is loopback on Linux")
def test_the_gateway_terminates_tls_and_forwards_fleet_calls(tls_server: tuple[Server, ssl.SSLContext]) -> None:
    server, context = tls_server
    base = f"https://{server.cfg.address}"
    assert _post(base + "/v1/fleet/get-run", context) not in (404, 405, 502)
    assert _post(base + "/v1/control/list-runs", context) == 404
    with pytest.raises(OSError):  # plain HTTP to the TLS port gets no HTTP answer (URLError or a reset)
        _post(f"http://{server.cfg.address}/v1/fleet/get-run", None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2 is loopback on Linux")
def test_flwr_calls_work_from_a_folder_holding_a_fedseg_directory(
    tls_server: tuple[Server, ssl.SSLContext], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the connection is named "fedseg"; flwr used to read it as the app folder ./fedseg ("Missing [tool.flwr.app]")
    (tmp_path / CONNECTION).mkdir()
    monkeypatch.chdir(tmp_path)
    server, _ = tls_server
    payload = server.control._call("ls", CONNECTION)
    assert payload["success"] is True
    assert os.getcwd() == str(tmp_path)
