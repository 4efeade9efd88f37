"""HTTPS end to end: a SuperLink with our certificates, `flwr run` over TLS, and a site joining with the CA."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import tomli_w

from fedseg.server.history import read_history
from fedseg.server.processes import free_port, tagged_processes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc"),
]

TAG = "FEDSEG_TLS_TAG"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate valid for localhost and 127.0.0.1."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.pem"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fedseg-test-ca",
             "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return ca, cert, key


def test_round_over_https_with_a_site_using_the_ca(tmp_path: Path) -> None:
    from fedseg.common.phantoms import generate_phantoms

    ca, cert, key = make_certificates(tmp_path)
    data = tmp_path / "data"
    generate_phantoms(data, sites=1, cases_per_site=2, val_cases=0, size=(16, 16, 16))
    port = free_port()
    config = {
        "rounds": 1,
        "min_sites": 1,
        "port": port,
        "output_dir": str(tmp_path / "run"),
        "round_timeout": 120.0,
        "site_wait_timeout": 120.0,
        "model": {"feature_scale": 64},
        "train": {"steps": 1, "batch_size": 2, "patch_size": [16, 16, 16], "amp": False},
        "tls": {"ca": str(ca), "cert": str(cert), "key": str(key)},
    }
    (tmp_path / "server.toml").write_text(tomli_w.dumps(config))
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG: tag, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    cli = "from fedseg.{}.cli import main; main()"
    server = subprocess.Popen(
        [sys.executable, "-c", cli.format("server"), "start", "--config", str(tmp_path / "server.toml")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    site = subprocess.Popen(
        [sys.executable, "-c", cli.format("client"), "join", "--site", "s1", "--data", str(data / "site-1"),
         "--labels", str(data / "site-1" / "labels.toml"), "--server", f"127.0.0.1:{port}",
         "--root-certificates", str(ca), "--workdir", str(tmp_path / "site")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        output, _ = server.communicate(timeout=170)
    finally:
        site.send_signal(signal.SIGTERM)
        site.wait(timeout=60)
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, output[-2000:]
    rows = read_history(tmp_path / "run")
    assert [r.round for r in rows] == [0, 1]
    assert [s.site for s in rows[1].sites] == ["s1"]
    deadline = time.monotonic() + 15
    while (left := tagged_processes(tag, TAG)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
