"""A foreign Flower App reaches a site and is refused there: none of its code runs, the site log names the run.

The attacker here is on the operator's side (it can submit runs on the server's loopback Control API). The site
runs ``fed-client join``'s SuperNode (``--isolation process``) with fedseg's gate. The foreign app's ClientApp
module writes a marker file the moment it is imported. As a control, the same app trusted with ``--trust-app``
does run (the marker appears), so the refusal is the gate's doing and not a broken test.
"""

from __future__ import annotations

import hashlib
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedseg.client.supernode import JoinOptions, gate_argv, supernode_argv
from fedseg.client.trust import fedseg_fab_hash
from fedseg.common.runtime.flwrctl import flower_env
from fedseg.common.runtime.processes import Child, Supervisor, free_port
from fedseg.server.config import ServerConfig
from fedseg.server.control.launch import Server, start_server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")]

PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "evilapp"
version = "1.0.0"
dependencies = ["flwr>=1.42,<1.43"]

[tool.flwr.app]
publisher = "evil"

[tool.flwr.app.components]
serverapp = "evilapp.server:app"
clientapp = "evilapp.client:app"

[tool.flwr.app.config]
attempt = 0
"""

SERVER = """\
import time
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes], timeout=120)
"""

CLIENT = """\
from pathlib import Path
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("foreign code ran at the site")  # what an attacker would do: read the CT, send it
app = ClientApp()


@app.train()
def train(msg, context):
    return msg.create_reply(msg.content)
"""


def _foreign_app(folder: Path, marker: Path, attempt: int) -> tuple[Path, str]:
    (folder / "evilapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.replace("attempt = 0", f"attempt = {attempt}"))
    (folder / "evilapp" / "__init__.py").write_text("")
    (folder / "evilapp" / "server.py").write_text(SERVER)
    (folder / "evilapp" / "client.py").write_text(textwrap.dedent(CLIENT.format(marker=str(marker))))
    return folder, hashlib.sha256(build_fab_from_disk(folder)).hexdigest()


def _submit(server: Server, app: Path, tmp: Path) -> int:
    overrides = tmp / f"{app.name}.toml"
    overrides.write_text("")
    return server.control.submit(app, overrides)


def _site(sup: Supervisor, server: Server, tmp: Path, name: str, trusted: frozenset[str]) -> Child:
    opts = JoinOptions(server=server.cfg.address, port=free_port(), trusted_apps=trusted)
    node_config = tmp / f"{name}.toml"
    node_config.write_text(f'site = "{name}"\n')
    env = flower_env(tmp / f"{name}-home")
    sup.start(f"{name}-supernode", supernode_argv(opts, node_config), env=env, log_path=tmp / f"{name}-sn.log")
    return sup.start(f"{name}-gate", gate_argv(opts), env=env, log_path=tmp / f"{name}-gate.log")


def _wait_for(predicate: object, timeout: float = 150.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.3)
    return False


def test_a_foreign_app_is_refused_at_the_site_and_runs_once_trusted(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    refused_app, refused_hash = _foreign_app(tmp_path / "evil1", marker, 1)
    trusted_app, trusted_hash = _foreign_app(tmp_path / "evil2", marker, 2)
    assert refused_hash != trusted_hash
    with Supervisor() as sup:
        server = start_server(sup, ServerConfig(port=free_port(), output_dir=tmp_path / "run"))
        gate = _site(sup, server, tmp_path, "hospital", frozenset({fedseg_fab_hash()}))
        run_id = _submit(server, refused_app, tmp_path)
        pattern = re.compile(rf"run {run_id} refused: its app \(FAB hash {refused_hash[:12]}")
        assert _wait_for(lambda: pattern.search(gate.log_tail(50)) is not None), gate.log_tail(20)
        assert not marker.exists()
        # the control: a site that trusts the (otherwise identical) second app runs it
        _site(sup, server, tmp_path, "trusting", frozenset({trusted_hash}))
        _submit(server, trusted_app, tmp_path)
        assert _wait_for(marker.exists), "the trusted foreign app never ran; the refusal above proves nothing"
    assert "refused" in gate.log_path.read_text()
