"""The throttling relay really throttles: rate and added latency measured on loopback."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.deploy.relay import Relay


class _Sink(socketserver.BaseRequestHandler):
    def handle(self) -> None:  # count bytes, answer with one byte at EOF
        total = 0
        while data := self.request.recv(65536):
            total += len(data)
            if total >= self.server.expect:  # type: ignore[attr-defined]
                self.request.sendall(b"k")
                return


@pytest.fixture
def sink() -> Iterator[socketserver.TCPServer]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _send(port: int, size: int) -> float:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"x" * size)
        assert sock.recv(1) == b"k"
    return time.monotonic() - start


def test_relay_paces_to_the_rate_and_adds_latency(sink: socketserver.TCPServer) -> None:
    size = 250_000  # 2 Mbit: 0.5 s at 4 Mbit/s, +0.1 s up and 0.1 s back
    sink.expect = size  # type: ignore[attr-defined]
    direct = _send(sink.server_address[1], size)
    with Relay(sink.server_address[1], rate_bps=4_000_000, latency_s=0.1) as relay:
        slow = _send(relay.port, size)
        assert relay.bytes_up == size and relay.bytes_down == 1
    theory = size * 8 / 4_000_000 + 2 * 0.1
    assert direct < 0.2 * theory, f"loopback itself took {direct:.2f} s"
    assert slow >= 0.8 * theory, f"relay took {slow:.2f} s, theory {theory:.2f} s: not throttled"
    assert slow < 5 * theory, f"relay took {slow:.2f} s, theory {theory:.2f} s"


def test_relay_rejects_a_bad_rate() -> None:
    with pytest.raises(ValueError, match="rate_bps"):
        Relay(1, rate_bps=0)
