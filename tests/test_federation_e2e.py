"""End to end on loopback over HTTPS: `fed-server start` + two honest `fed-client join` and a rogue third site,
2 rounds, no process left over.

The rogue site is a real `fed-client join` whose Python a hostile hospital altered: a ``sitecustomize.py`` on its
PYTHONPATH wraps fedseg's site training function so that every weight it returns is ×100. The server must drop
its reply every round, with the reason, and federate the honest two.

TLS uses a throw-away CA and server certificate (openssl); the plain-HTTP path runs end to end in
tests/server/test_site_failure.py and tests/server/test_start_shutdown.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import tomli_w
import torch

from fedseg.common.engine.checkpoint import load_checkpoint, read_meta
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.runtime.processes import free_port, tagged_processes
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.run.history import read_history

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

TAG = "FEDSEG_E2E_TAG"
CLI = "from fedseg.{side}.cli.main import main; main()"
SITES = ("site-1", "site-2")
ROGUE = "site-3"
#: The rogue site's sitecustomize.py: once fedseg's training module is imported (in the ClientApp process),
#: ``train_locally`` returns every floating-point weight x100 (unpacked, scaled and packed again, as the server sends
#: packed tasks).
ROGUE_PYTHON = """
import importlib.abc, importlib.util, sys

def _poison(module):
    from flwr.app import Array, ArrayRecord
    from fedseg.common.fl.packing import is_packed, pack_arrays, unpacked
    from fedseg.common.nn.model import build_model
    honest = module.train_locally

    def train_locally(*args, **kwargs):
        arrays, result = honest(*args, **kwargs)
        task, packed = args[1], is_packed(arrays)
        if packed:
            arrays = unpacked(arrays, build_model(task.model).state_dict(), task.transport)
        scaled = {k: a.numpy() * 100 if a.numpy().dtype.kind == "f" else a.numpy() for k, a in arrays.items()}
        poisoned = ArrayRecord({k: Array(v) for k, v in scaled.items()})
        return (pack_arrays(poisoned) if packed else poisoned), result

    module.train_locally = train_locally

class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "fedseg.client.training":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            _poison(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Hook())
"""


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, str]:
    """A throw-away CA and a server certificate valid for localhost and 127.0.0.1 (the ``[tls]`` table)."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.pem"))
    subject = ["-nodes", "-days", "2", "-subj"]
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", *subject, "/CN=fedseg-test-ca", "-keyout", str(ca_key), "-out", str(ca)
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    signing = ["-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2", "-extfile", str(ext)]
    _openssl("x509", "-req", "-in", str(csr), *signing, "-out", str(cert))
    return {"ca": str(ca), "cert": str(cert), "key": str(key)}


def _spawn(side: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", CLI.format(side=side), *args], env=env, stdout=handle, stderr=subprocess.STDOUT
        )


def _server_toml(tmp_path: Path, data: Path, port: int) -> Path:
    config = {
        "tls": make_certificates(tmp_path),
        "rounds": 2,
        "min_sites": 3,
        "cross_site_every": 0,  # the sites score the final model on their own cases
        "round_timeout": 300.0,
        "site_wait_timeout": 300.0,
        "output_dir": str(tmp_path / "run"),
        "port": port,
        "model": {"feature_scale": 16},
        "train": {"steps": 4, "batch_size": 2, "patch_size": [32, 32, 32], "lr": 3e-3, "amp": False},
        "validation": {
            "data": str(data / "validation"),
            "labels": str(data / "validation" / "labels.toml"),
            "patch_size": [32, 32, 32],
        },
    }
    path = tmp_path / "server.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def _join_args(name: str, data: Path, port: int, tmp_path: Path) -> list[str]:
    site = ["join", "--site", name, "--data", str(data / name), "--labels", str(data / name / "labels.toml")]
    connection = ["--server", f"127.0.0.1:{port}", "--root-certificates", str(tmp_path / "ca.crt")]
    return [*site, *connection, "--workdir", str(tmp_path / "sites" / name)]


def test_two_sites_two_rounds_on_loopback_with_a_rogue_third(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_phantoms(data, sites=2, cases_per_site=2, val_cases=1, size=(32, 32, 32))
    generate_phantoms(data / "rogue", sites=1, cases_per_site=1, val_cases=0, size=(32, 32, 32), seed=3)
    (data / "rogue" / "site-1").rename(data / ROGUE)
    rogue_python = tmp_path / "rogue-python"
    rogue_python.mkdir()
    (rogue_python / "sitecustomize.py").write_text(ROGUE_PYTHON)
    port = free_port()
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG: tag, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    server = _spawn("server", ["start", "--config", str(_server_toml(tmp_path, data, port))], env, tmp_path / "s.log")
    sites = [_spawn("client", _join_args(name, data, port, tmp_path), env, tmp_path / f"{name}.log") for name in SITES]
    rogue_env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(rogue_python), env.get("PYTHONPATH")])))
    sites.append(_spawn("client", _join_args(ROGUE, data, port, tmp_path), rogue_env, tmp_path / f"{ROGUE}.log"))
    try:
        server.wait(timeout=900)  # a ceiling for a loaded machine, not an expectation
    finally:
        for site in sites:
            site.send_signal(signal.SIGTERM)
        for site in sites:
            site.wait(timeout=120)
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=120)
    output = (tmp_path / "s.log").read_text()
    assert server.returncode == 0, output[-2000:]
    assert re.search(r"run \d+ completed in", output), output[-2000:]

    rows = read_history(tmp_path / "run")
    assert [r.round for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert sorted(s.site for s in row.sites) == ["site-1", "site-2"]  # the honest sites are used
        assert [r.site for r in row.rejected] == [ROGUE], row.rejected  # the rogue is dropped, every round
        assert "x the round's median" in row.rejected[0].reason
        assert row.failures == 1
    # Cross-site validation after the last round only: each site's own (aggregate) scores, per organ with n.
    assert rows[1].cross_site == {}
    matrix = rows[2].cross_site
    assert sorted(matrix) == ["site-1", "site-2", ROGUE]
    for organs in matrix.values():
        assert set(organs) == {"pancreas", "spleen", "kidney", "liver"}
        assert all(0 <= scores["dice"]["n"] <= 2 for scores in organs.values())
        assert any(scores["dice"]["n"] > 0 and 0 <= scores["dice"]["mean"] <= 1 for scores in organs.values())
        assert all(s.cases == 2 and s.samples == 8 for s in row.sites)
        assert row.bytes_out > 0 and row.bytes_in > 0
    assert set(rows[2].dice) == {"dice_pancreas", "dice_spleen", "dice_kidney", "dice_liver", "dice_mean"}
    assert len((tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()) == 4
    assert read_meta(tmp_path / "run" / "checkpoints" / "last.pt").round == 2
    # the federation learned: the global model moved away from its seeded start and central Dice rose
    torch.manual_seed(0)  # the ServerApp's seeded initial model (seed = 0)
    start = build_model(ModelConfig(feature_scale=16)).state_dict()
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt").model.state_dict()
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.allclose(v, final[k])]
    assert len(moved) > len(start) // 2
    dice = [row.dice["dice_mean"] for row in rows]
    assert dice[2] > dice[0] + 0.02, dice
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()

    assert "rejected the reply of site-3" in (tmp_path / "run" / "logs" / "serverapp.log").read_text()
    assert [s.returncode for s in sites] == [0, 0, 0]
    for name in (*SITES, ROGUE):
        assert f"site {name} left the federation" in (tmp_path / f"{name}.log").read_text()
    deadline = time.monotonic() + 60
    while (left := tagged_processes(tag, TAG)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], "processes left over"
