"""Attacks from the sites' side: only Flower's Fleet API answers on the address ``fed-server start`` exposes.

The "public" address is 127.0.0.2 (another loopback address), the operator's side is 127.0.0.1. Each probe is
made once against the public address (must be refused) and, where that proves the probe works at all, once
against the SuperLink's loopback port (must succeed), so none of these tests can pass by being broken.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.superlink.routers.control.router import router as control_router

from fedseg.common.runtime.flwrctl import CONNECTION, flower_env, flower_executable, write_connection
from fedseg.common.runtime.processes import Supervisor, free_port, host_port
from fedseg.server.config import ServerConfig
from fedseg.server.control.launch import Server, start_server
from fedseg.server.control.runs import stage_app

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2 is loopback on Linux")

PUBLIC = "127.0.0.2"


@dataclass
class Federation:
    server: Server
    public: str  # host:port sites dial
    internal: str  # host:port of the SuperLink on loopback
    tmp: Path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    tmp = tmp_path_factory.mktemp("attack")
    cfg = ServerConfig(host=PUBLIC, port=free_port(PUBLIC), output_dir=tmp / "run")
    with Supervisor() as sup:
        server = start_server(sup, cfg)
        yield Federation(server, cfg.address, host_port("127.0.0.1", server.internal_port), tmp)


def _flwr(fed: Federation, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    home = fed.tmp / f"attacker-{address.replace(':', '-')}"
    write_connection(home, address, None)
    argv = [flower_executable("flwr"), *args]
    return subprocess.run(argv, env=flower_env(home), cwd=home, capture_output=True, text=True, timeout=120)


def _refused(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode != 0 or '"success": false' in done.stdout


def _post(url: str, body: bytes = b"") -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_flwr_ls_works_on_loopback_but_not_from_the_public_address(federation: Federation) -> None:
    assert not _refused(_flwr(federation, federation.internal, "ls", CONNECTION, "--format", "json"))
    assert _refused(_flwr(federation, federation.public, "ls", CONNECTION, "--format", "json"))


@pytest.mark.parametrize("command", [["log", "1", CONNECTION], ["stop", "1", CONNECTION], ["supernode", "ls"]])
def test_flwr_control_commands_are_refused_from_the_public_address(federation: Federation, command: list[str]) -> None:
    args = [*command, CONNECTION] if command[0] == "supernode" else command
    assert _refused(_flwr(federation, federation.public, *args, "--format", "json"))


def test_flwr_run_of_an_app_is_refused_from_the_public_address(federation: Federation) -> None:
    app = stage_app(federation.tmp / "attacker-app")
    assert _refused(_flwr(federation, federation.public, "run", str(app), CONNECTION, "--format", "json"))


def test_registering_a_node_key_is_refused_from_the_public_address(federation: Federation) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = federation.tmp / "attacker.pub"
    path.write_bytes(public + b"\n")
    done = _flwr(federation, federation.public, "supernode", "register", str(path), CONNECTION, "--format", "json")
    assert _refused(done), done.stdout


def _control_paths() -> list[str]:
    return sorted({route.path for route in control_router.routes if hasattr(route, "path")})


def test_every_control_route_answers_404_from_the_public_address(federation: Federation) -> None:
    paths = _control_paths()
    assert len(paths) > 20  # Flower 1.42 has ~30 Control routes; an empty list would make this test vacuous
    answers = {path: _post(f"http://{federation.public}{path}") for path in paths}
    assert {path for path, code in answers.items() if code != 404} == set()
    # the same request reaches the SuperLink on loopback (it parses the body, so not a 404)
    assert _post(f"http://{federation.internal}/v1/control/list-runs") != 404


@pytest.mark.parametrize("path", ["/health", "/docs", "/openapi.json", "/v1/runtime/get-run", "/v1/fleet/../control/x"])
def test_non_fleet_paths_are_not_served_publicly(federation: Federation, path: str) -> None:
    assert _post(f"http://{federation.public}{path}") == 404
    try:
        urllib.request.urlopen(f"http://{federation.public}{path}", timeout=30)
        code = 200
    except urllib.error.HTTPError as err:
        code = err.code
    assert code in (404, 405)


def test_fleet_calls_are_forwarded(federation: Federation) -> None:
    # an empty protobuf body is a valid GetRunRequest for run 0: the SuperLink answers (not the gateway's 404)
    assert _post(f"http://{federation.public}/v1/fleet/get-run") not in (404, 405, 502)


def test_the_superlink_itself_does_not_listen_on_the_public_address(federation: Federation) -> None:
    port = federation.server.internal_port
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{host_port(PUBLIC, port)}/health", timeout=10)
