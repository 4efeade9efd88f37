"""A throttling TCP relay: a slow link (bandwidth and added latency each way) between a site and the server.

``Relay(target_port, rate_bps=4_000_000, latency_s=0.1)`` listens on 127.0.0.1 (``relay.port``) and forwards every
connection to ``127.0.0.1:target_port``; each direction is paced to ``rate_bps`` bits per second and every chunk is
delivered ``latency_s`` after it was read. It runs its own asyncio loop in a daemon thread (``start``/``stop``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

log = logging.getLogger(__name__)

_CHUNK = 16 * 1024


class Relay:
    """A slow link on loopback: ``rate_bps`` bits per second and ``latency_s`` added each way."""

    def __init__(self, target_port: int, *, rate_bps: float = 4_000_000, latency_s: float = 0.1) -> None:
        if rate_bps <= 0 or latency_s < 0:
            raise ValueError(f"rate_bps must be > 0 and latency_s >= 0, got {rate_bps}, {latency_s}")
        self.target_port = target_port
        self.rate_bps = rate_bps
        self.latency_s = latency_s
        self.port = 0
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def start(self) -> Relay:
        """Start listening; returns once ``port`` is set."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start within 10 s")
        log.info(
            "relay 127.0.0.1:%d -> 127.0.0.1:%d at %.0f bit/s, %.0f ms each way",
            self.port,
            self.target_port,
            self.rate_bps,
            self.latency_s * 1000,
        )
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the loop thread."""
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError as exc:
            log.warning("relay: cannot reach 127.0.0.1:%d: %s", self.target_port, exc)
            client_w.close()
            return
        await asyncio.gather(
            self._pipe(client_r, server_w, up=True), self._pipe(server_r, client_w, up=False), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        """Read chunks, pace them to the rate, deliver each ``latency_s`` after it arrived."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(deliver())
        free_at = time.monotonic()  # when the link is free for the next bit
        try:
            while data := await reader.read(_CHUNK):
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                free_at = max(free_at, time.monotonic()) + len(data) * 8 / self.rate_bps
                wait = free_at - time.monotonic()
                if wait > 0:  # the sender's window fills: back-pressure like a real slow link
                    await asyncio.sleep(wait)
                queue.put_nowait((free_at + self.latency_s, data))
        finally:
            queue.put_nowait((0.0, b""))
            await asyncio.gather(sender, return_exceptions=True)
