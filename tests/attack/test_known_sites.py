"""Known sites only: with TLS off loopback, node authentication is on by default and only listed keys connect.

The server exposes 127.0.0.2 with certificates from ``fed-server certs`` and one allowed site. A SuperNode with an
unlisted key is refused by the SuperLink (it exits); the listed site's SuperNode connects (the control). A
``fed-client join`` with an unlisted key stops with the SuperLink's reason and never says "connected".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedseg.client.keys import make_site_key
from fedseg.client.supernode import JoinOptions, supernode_argv
from fedseg.common.runtime.flwrctl import CONNECTION, flower_env
from fedseg.common.runtime.processes import Child, Supervisor, free_port
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.app import registered_sites
from fedseg.server.config import RunSpec, ServerConfig, TLSConfig
from fedseg.server.control.certs import make_certificates
from fedseg.server.control.launch import Server, start_server
from fedseg.server.control.runs import SPEC_ENV, SPEC_FILE
from fedseg.server.control.sites import NODE_SITES_FILE, add_site

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2 is loopback on Linux")]

PUBLIC = "127.0.0.2"


@dataclass
class Setup:
    server: Server
    sup: Supervisor
    tmp: Path
    ca: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("sites")
    files = make_certificates(tmp / "certs", [PUBLIC])
    make_site_key(tmp / "hospital-a")
    add_site(tmp / "sites.toml", "hospital-a", tmp / "hospital-a" / "site-key.pub")
    cfg = ServerConfig(
        host=PUBLIC,
        port=free_port(PUBLIC),
        output_dir=tmp / "run",
        tls=TLSConfig(ca=files.ca, cert=files.cert, key=files.key),
        sites_file=tmp / "sites.toml",
        supernode_auth=True,  # the default for a non-loopback host with TLS; 127.0.0.2 counts as loopback
    )
    assert cfg.model_copy(update={"host": "10.0.0.1", "supernode_auth": None}).node_auth
    with Supervisor() as sup:
        yield Setup(start_server(sup, cfg), sup, tmp, files.ca)


def _supernode(setup: Setup, name: str, key: Path) -> Child:
    opts = JoinOptions(server=setup.server.cfg.address, port=free_port(), root_certificates=setup.ca, auth_key=key)
    node_config = setup.tmp / f"{name}.toml"
    node_config.write_text(f'site = "{name}"\n')
    argv = supernode_argv(opts, node_config)
    return setup.sup.start(name, argv, env=flower_env(setup.tmp / f"{name}-home"), log_path=setup.tmp / f"{name}.log")


def _online(setup: Setup) -> list[dict[str, object]]:
    payload = setup.server.control._call("supernode", "ls", CONNECTION)
    return [n for n in payload.get("nodes", []) if str(n.get("status", "")).startswith("online")]


def test_start_registered_the_allowed_site_under_its_name(setup: Setup) -> None:
    nodes = json.loads((setup.server.private_dir / NODE_SITES_FILE).read_text())
    assert list(nodes.values()) == ["hospital-a"]
    # what the ServerApp locks in its SiteRegistry (it reads the map next to the spec file it is named)
    env = {SPEC_ENV: str(setup.server.private_dir / SPEC_FILE)}
    assert registered_sites(RunSpec(config=setup.server.cfg), env) == {int(k): v for k, v in nodes.items()}


def test_an_unlisted_site_key_is_refused_and_a_listed_one_connects(setup: Setup) -> None:
    make_site_key(setup.tmp / "rogue")
    rogue = _supernode(setup, "rogue", setup.tmp / "rogue" / "site-key")
    good = _supernode(setup, "hospital-a", setup.tmp / "hospital-a" / "site-key")
    deadline = time.monotonic() + 90
    while rogue.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert rogue.process.returncode not in (None, 0), "the rogue SuperNode was not refused"
    while not _online(setup) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert good.process.poll() is None, good.log_tail(5)
    online = _online(setup)
    assert len(online) == 1, online


def test_join_with_an_unlisted_key_stops_with_the_reason_and_never_says_connected(setup: Setup) -> None:
    data = setup.tmp / "join-data"
    generate_phantoms(data, sites=1, cases_per_site=2, val_cases=0, size=(16, 16, 16))
    make_site_key(setup.tmp / "rogue-join")
    workdir = setup.tmp / "rogue-join-work"
    args = ["join", "--site", "rogue", "--data", str(data / "site-1"), "--server", setup.server.cfg.address,
            "--root-certificates", str(setup.ca), "--auth-key", str(setup.tmp / "rogue-join" / "site-key"),
            "--workdir", str(workdir), "--cold-start"]  # fmt: skip
    cli = "from fedseg.client.cli.main import main; main()"
    env = dict(os.environ, COLUMNS="400", OMP_NUM_THREADS="1")
    # waits for the process to exit; the old join restarted the refused SuperNode until this timeout
    done = subprocess.run([sys.executable, "-c", cli, *args], capture_output=True, text=True, env=env, timeout=120)
    output = done.stdout + done.stderr
    supernode_log = (workdir / "logs" / "supernode.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in supernode_log  # the attack fired: the SuperLink refused the key
    assert done.returncode == 1, output
    assert "connected" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert f"the server at {setup.server.cfg.address} refused this SuperNode (Flower exit code 305:" in errors[0]
    assert "[code: 2004] Failed to activate SuperNode." in errors[0]
    assert "Traceback" not in output
    assert supernode_log.count("Starting Flower SuperNode") == 1  # not restarted
