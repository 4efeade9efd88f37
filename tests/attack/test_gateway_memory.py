"""Attacks on the real gateway process: an oversize body costs it nothing like the body's size.

A POST declaring 300 MiB and never finishing used to be read into memory before the SuperLink saw who sent it
(RSS 41 -> 341 MB, and no answer ever). The gateway runs here as ``fed-server`` runs it, over real sockets, capped
at 1 MiB, in front of a stand-in SuperLink that records what reaches it; its peak RSS (VmHWM) is read from /proc.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fedseg.common.runtime.processes import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

CAP = 2**20
HUGE = 300 * 2**20
PIECE = 64 * 2**10
#: Peak-RSS growth allowed for an attack (a few caps of buffers, far below the 300 MiB an attack offers).
MAX_GROWTH = 16 * 2**20


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    address: tuple[str, int]
    log: Path
    received: list[int] = field(default_factory=list)  # body sizes the stand-in SuperLink got

    def peak_rss(self) -> int:
        """The gateway's peak resident memory in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")


def _upstream(received: list[int]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(len(self.rfile.read(int(self.headers.get("Content-Length", "0")))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # the gateway's 404
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    received: list[int] = []
    upstream = _upstream(received)
    port = free_port()
    argv = [sys.executable, "-m", "fedseg.server.control.gateway", "--listen", f"127.0.0.1:{port}"]
    argv += ["--upstream", f"http://127.0.0.1:{upstream.server_address[1]}", "--max-body", str(CAP)]
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not _answers(f"http://127.0.0.1:{port}/") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # polls for the gateway's first answer
    try:
        assert process.poll() is None, "the gateway did not start"
        yield Gateway(process, ("127.0.0.1", port), log, received)
    finally:
        process.terminate()
        process.wait(timeout=30)
        upstream.shutdown()


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer.split()[1])


def _legit_post(gateway: Gateway, size: int) -> int:
    url = f"http://{gateway.address[0]}:{gateway.address[1]}/v1/fleet/push-object"
    request = urllib.request.Request(url, data=b"x" * size, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return int(answer.status)


def test_a_fleet_body_up_to_the_cap_reaches_the_superlink_whole(gateway: Gateway) -> None:
    assert _legit_post(gateway, CAP) == 200
    assert gateway.received[-1] == CAP


def test_an_unfinished_post_declaring_300_mib_gets_413_at_once(gateway: Gateway) -> None:
    _legit_post(gateway, CAP)  # the peak of legit traffic is the baseline
    before = gateway.peak_rss()
    forwarded = len(gateway.received)
    with socket.create_connection(gateway.address, timeout=30) as sock:
        head = f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: {HUGE}\r\n\r\n"
        sock.sendall(head.encode() + b"x" * PIECE)  # ... and the rest never comes
        assert _status(sock.recv(4096)) == 413  # the old gateway waited here for 300 MiB (recv timed out)
    assert gateway.peak_rss() - before < MAX_GROWTH
    assert len(gateway.received) == forwarded  # nothing of it reached the SuperLink


def _stream_until_answered(sock: socket.socket, limit: int) -> tuple[int, bytes]:
    """Send 64 KiB chunks (chunked encoding) until the gateway answers or ``limit`` bytes are sent."""
    sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = f"{PIECE:x}\r\n".encode() + b"x" * PIECE + b"\r\n"
    sent = 0
    while sent < limit:
        readable, writable, _ = select.select([sock], [sock], [], 30)
        if readable:
            break
        assert writable, "the gateway neither read nor answered for 30 s"
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break  # it stopped reading: its answer is waiting
        sent += PIECE
    return sent, sock.recv(4096)


def test_a_streamed_body_is_cut_with_413_just_past_the_cap(gateway: Gateway) -> None:
    _legit_post(gateway, CAP)
    before = gateway.peak_rss()
    forwarded = len(gateway.received)
    with socket.create_connection(gateway.address, timeout=30) as sock:
        sent, answer = _stream_until_answered(sock, HUGE)
    assert _status(answer) == 413
    assert CAP < sent < HUGE // 10  # the attack passed the cap, and the gateway stopped it soon after
    assert gateway.peak_rss() - before < MAX_GROWTH  # the old gateway's grew by the 300 MiB
    assert len(gateway.received) == forwarded


def test_a_client_leaving_mid_body_is_one_log_line_not_a_traceback(gateway: Gateway) -> None:
    with socket.create_connection(gateway.address, timeout=30) as sock:
        sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\nxx")
    deadline = time.monotonic() + 30
    while "left mid-upload" not in gateway.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # polls for the gateway's log line
    text = gateway.log.read_text()
    assert "a client left mid-upload on /v1/fleet/push-object" in text
    assert "Traceback" not in text, text[-2000:]
