"""deploy/nginx/fedseg.conf, run for real in front of a SuperLink: Fleet calls pass, Control routes do not.

Only the listen port, the certificate paths and the upstream port of the shipped file are rewritten for the test;
every rule is the shipped one. Skipped when nginx is not installed (CI: apt-get install nginx-light).
"""

from __future__ import annotations

import re
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.superlink.routers.control.router import router as control_router

from fedseg.common.runtime.processes import Supervisor, free_port
from fedseg.server.config import ServerConfig, TLSConfig
from fedseg.server.control.certs import make_certificates
from fedseg.server.control.launch import start_server

CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "fedseg.conf"
PUBLIC = "127.0.0.2"

pytestmark = [
    pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (apt-get install nginx-light)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2 is loopback on Linux"),
]


def _config(tmp: Path, listen: int, upstream: int, certs: Path) -> Path:
    text = CONF.read_text()
    text = re.sub(r"listen \d+ ssl;", f"listen {PUBLIC}:{listen} ssl;", text)
    text = text.replace("/etc/fedseg/certs", str(certs))
    text = text.replace("https://127.0.0.1:9093/", f"https://127.0.0.1:{upstream}/")
    assert text.count(str(certs)) >= 3 and f":{upstream}/" in text and f":{listen} ssl" in text
    (tmp / "logs").mkdir()
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/logs/error.log;\nevents {{}}\n"
        f"http {{\naccess_log off;\nclient_body_temp_path {tmp}/body;\nproxy_temp_path {tmp}/proxy;\n{text}\n}}\n"
    )
    return conf


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ssl.SSLContext, int]]:
    tmp = tmp_path_factory.mktemp("nginx")
    files = make_certificates(tmp / "certs", [PUBLIC])
    tls = TLSConfig(ca=files.ca, cert=files.cert, key=files.key)
    cfg = ServerConfig(port=free_port(), internal_port=free_port(), output_dir=tmp / "run", tls=tls)
    listen = free_port(PUBLIC)
    conf = _config(tmp, listen, cfg.internal_port, tmp / "certs")
    with Supervisor() as sup:
        start_server(sup, cfg)
        child = sup.start("nginx", ["nginx", "-p", str(tmp), "-c", str(conf)], log_path=tmp / "nginx.out")
        context = ssl.create_default_context(cafile=str(files.ca))
        base = f"https://{PUBLIC}:{listen}"
        deadline = time.monotonic() + 30
        while _post(base + "/", context) is None:
            assert child.process.poll() is None, child.log_tail(5)
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.2)
        yield base, context, cfg.internal_port


def _post(url: str, context: ssl.SSLContext, method: str = "POST") -> int | None:
    data = b"" if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (urllib.error.URLError, OSError):
        return None


def test_nginx_forwards_fleet_calls_over_tls(nginx: tuple[str, ssl.SSLContext, int]) -> None:
    base, context, _ = nginx
    assert _post(base + "/v1/fleet/get-run", context) not in (None, 403, 404, 405, 502)


def test_nginx_refuses_every_control_route_and_other_paths(nginx: tuple[str, ssl.SSLContext, int]) -> None:
    base, context, internal = nginx
    paths = sorted({r.path for r in control_router.routes if hasattr(r, "path")})
    assert len(paths) > 20
    others = ["/health", "/docs", "/openapi.json", "/v1/runtime/get-run", "/v1/fleet/../control/list-runs"]
    answers = {p: _post(base + p, context) for p in [*paths, *others]}
    assert {p: c for p, c in answers.items() if c not in (403, 404)} == {}
    assert _post(base + "/v1/fleet/get-run", context, method="GET") in (403, 405)
    # the control route itself works on the SuperLink's loopback port, so the 404s above are nginx's doing
    assert _post(f"https://127.0.0.1:{internal}/v1/control/list-runs", context) not in (None, 404)
