"""The fleet-only gateway: the one address sites reach, forwarding nothing but Flower's Fleet API.

In open-source Flower the SuperLink serves the Fleet API (what SuperNodes use), the Control API (submit, list,
stop runs; register node keys) and the Runtime API on one unauthenticated port. ``fed-server start`` therefore
binds the SuperLink to ``127.0.0.1`` on an internal port and runs this gateway on the public address: an ASGI
app (Starlette on uvicorn) that forwards ``POST /v1/fleet/<name>`` with httpx and answers 404 to every other
path and 405 to every other method. It terminates TLS when given a certificate and exits when its parent dies.

It is the one process that anyone on the network can talk to before the SuperLink has seen who they are, so it
bounds what a request can cost it: a body is read as a stream and refused with 413 as soon as its declared or
streamed size passes ``max_body``, and at most ``max_bodies`` bodies are received at once (503, which Flower's
SuperNode retries with backoff: a few idle uploads cannot hold the gateway's memory or all its connections). The
cap is fixed, not derived from the model: the gateway starts before any run and does not know it, and need not,
since Flower 1.42 cuts every array into objects of at most 5 MiB (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), one
request each, whatever the model's size; 64 MiB leaves room for a site that raises that chunk size. Uploads
being received hold at most ``max_bodies * max_body`` bytes (2 GiB at the defaults; lower either on a small host).
A client that disconnects mid-body is logged in one line, not a traceback.

Run as ``python -m fedseg.server.control.gateway --listen HOST:PORT --upstream URL [...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger(__name__)

#: The only requests forwarded: a POST to one Fleet API method (names are lower-case words and dashes).
FLEET_PATH = re.compile(r"^/v1/fleet/[a-z][a-z-]{0,63}$")
#: Request headers passed upstream (Flower's protobuf body type, version and node-auth signature headers).
_DROPPED_HEADERS = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"})
#: Seconds a forwarded Fleet call may take (pull/push of 5 MiB chunks on a slow link).
UPSTREAM_TIMEOUT = 600.0
#: The largest request body forwarded (bytes) and the most bodies received at once.
MAX_BODY = 64 * 2**20
MAX_BODIES = 32


class TooLarge(Exception):
    """A request body passed the cap."""


async def read_capped(request: Request, cap: int) -> bytes:
    """The request's body, read as a stream and never past ``cap`` bytes.

    Raises:
        TooLarge: its Content-Length or the bytes streamed so far exceed ``cap``.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def is_forwarded(method: str, path: str) -> bool:
    """Whether the gateway forwards ``method path`` to the SuperLink."""
    return method == "POST" and FLEET_PATH.match(path) is not None


def build_app(
    upstream: str, upstream_ca: Path | None = None, max_body: int = MAX_BODY, max_bodies: int = MAX_BODIES
) -> Starlette:
    """The gateway ASGI app forwarding Fleet calls to ``upstream`` (``http(s)://127.0.0.1:PORT``), bodies capped
    at ``max_body`` bytes, at most ``max_bodies`` received at once (module docstring)."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(upstream_ca)) if upstream_ca else True
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=UPSTREAM_TIMEOUT)
    receiving = [0]

    async def body_of(request: Request) -> bytes | Response:
        if receiving[0] >= max_bodies:
            return PlainTextResponse("too many uploads at once\n", status_code=503, headers={"Retry-After": "1"})
        receiving[0] += 1
        try:
            return await read_capped(request, max_body)
        except TooLarge:
            log.warning("refused a body over %d bytes for %s", max_body, request.url.path)
            return PlainTextResponse("request body too large\n", status_code=413)
        except ClientDisconnect:
            log.info("a client left mid-upload on %s", request.url.path)
            return PlainTextResponse("", status_code=400)  # nobody is left to read it
        finally:
            receiving[0] -= 1

    async def forward(request: Request) -> Response:
        if not is_forwarded(request.method, request.url.path):
            status = 405 if FLEET_PATH.match(request.url.path) else 404
            return PlainTextResponse("not served here\n", status_code=status)
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROPPED_HEADERS]
        outgoing = client.build_request("POST", request.url.path, headers=headers, content=body)
        try:
            answer = await client.send(outgoing, stream=True)
        except httpx.HTTPError as err:
            log.warning("SuperLink unreachable for %s: %s", request.url.path, err)
            return PlainTextResponse("SuperLink unavailable\n", status_code=502)
        passed = {k: v for k, v in answer.headers.items() if k.lower() not in _DROPPED_HEADERS | {"content-length"}}
        return StreamingResponse(
            answer.aiter_raw(), status_code=answer.status_code, headers=passed, background=BackgroundTask(answer.aclose)
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    everything = Route("/{path:path}", forward, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    return Starlette(routes=[everything], lifespan=lifespan)


async def _watch_parent(parent: int, server: uvicorn.Server) -> None:
    """Stop the gateway within a second of its parent (``fed-server``) going away."""
    while not server.should_exit:
        if os.getppid() != parent:
            log.warning("parent %d is gone; gateway stopping", parent)
            server.should_exit = True
        await asyncio.sleep(1.0)


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedseg-gateway", description="Forward only Flower's Fleet API.")
    parser.add_argument("--listen", required=True, help="public HOST:PORT")
    parser.add_argument("--upstream", required=True, help="SuperLink URL on loopback, e.g. https://127.0.0.1:9093")
    parser.add_argument("--upstream-ca", type=Path, help="CA file to verify the SuperLink's certificate")
    parser.add_argument("--certfile", type=Path, help="server certificate (TLS on the public side)")
    parser.add_argument("--keyfile", type=Path, help="server private key")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer the parent")
    parser.add_argument("--max-body", type=int, default=MAX_BODY, help="largest request body in bytes (413 beyond)")
    parser.add_argument("--max-bodies", type=int, default=MAX_BODIES, help="bodies received at once (503 beyond)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    host, port = _split_listen(args.listen)
    config = uvicorn.Config(
        build_app(args.upstream, args.upstream_ca, args.max_body, args.max_bodies),
        host=host,
        port=port,
        ssl_certfile=str(args.certfile) if args.certfile else None,
        ssl_keyfile=str(args.keyfile) if args.keyfile else None,
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    watcher = asyncio.ensure_future(_watch_parent(args.parent_pid, server)) if args.parent_pid else None
    await server.serve()
    if watcher is not None:
        watcher.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the gateway process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s gateway: %(message)s")
    asyncio.run(_serve(_parse(argv)))


if __name__ == "__main__":
    main()
