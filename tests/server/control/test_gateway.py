"""The public gateway bounds what an unauthenticated request can cost it: bodies capped (413) before they are
read whole, and a bounded number of bodies received at once (503)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from fedseg.server.control.gateway import build_app

CAP = 64 * 1024
UPSTREAM = "http://127.0.0.1:9"  # nothing listens: a forwarded call answers 502


def client(**caps: int) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=build_app(UPSTREAM, **caps))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway")


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_a_declared_oversize_body_is_refused_at_once() -> None:
    async def attack() -> httpx.Response:
        async with client(max_body=CAP) as c:
            return await c.post("/v1/fleet/push-messages", content=b"x" * (CAP + 1))

    assert run(attack()).status_code == 413  # type: ignore[attr-defined]


def test_a_streamed_body_is_cut_at_the_cap_without_being_read_whole() -> None:
    sent = [0]

    async def endless() -> AsyncIterator[bytes]:  # no Content-Length: chunked, 300 MiB if read to the end
        for _ in range(300 * 16):
            sent[0] += 1
            yield b"x" * (64 * 1024)

    async def attack() -> httpx.Response:
        async with client(max_body=CAP) as c:
            return await c.post("/v1/fleet/push-messages", content=endless())

    assert run(attack()).status_code == 413  # type: ignore[attr-defined]
    assert sent[0] < 10, f"the gateway read {sent[0]} chunks of a body over its cap"


def test_a_body_within_the_cap_is_forwarded() -> None:
    async def call() -> httpx.Response:
        async with client(max_body=CAP) as c:
            return await c.post("/v1/fleet/push-messages", content=b"x" * CAP)

    assert run(call()).status_code == 502  # it went upstream (which is down here)


def test_uploads_beyond_the_concurrency_bound_get_503() -> None:
    async def attack() -> list[int]:
        release = asyncio.Event()
        started = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield b"x"
            started.set()
            await release.wait()  # an upload that never finishes on its own

        async with client(max_body=CAP, max_bodies=1) as c:
            first = asyncio.create_task(c.post("/v1/fleet/push-messages", content=slow()))
            await asyncio.wait_for(started.wait(), 10)
            second = await c.post("/v1/fleet/push-messages", content=b"y")
            release.set()
            return [second.status_code, (await first).status_code]

    codes = run(attack())
    assert codes == [503, 502]


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/fleet/pull-messages", 405), ("POST", "/x", 404)])
def test_only_the_fleet_api_is_served(method: str, path: str, status: int) -> None:
    async def call() -> httpx.Response:
        async with client() as c:
            return await c.request(method, path)

    assert run(call()).status_code == status  # type: ignore[attr-defined]


def test_server_toml_sets_the_gateways_caps_and_its_defaults_are_the_gateways() -> None:
    from fedseg.server.config import GatewayConfig, ServerConfig
    from fedseg.server.control.front import gateway_argv
    from fedseg.server.control.gateway import MAX_BODIES, MAX_BODY

    default = GatewayConfig()
    assert (default.max_body_mib * 2**20, default.max_uploads) == (MAX_BODY, MAX_BODIES)
    argv = gateway_argv(ServerConfig.model_validate({"gateway": {"max_body_mib": 8, "max_uploads": 4}}), 1234)
    assert argv[argv.index("--max-body") + 1] == str(8 * 2**20)
    assert argv[argv.index("--max-bodies") + 1] == "4"
