"""A site behind a forward proxy: ``fed-client join --proxy http://HOST:PORT`` or the ``HTTPS_PROXY`` convention.

Flower 1.42's SuperNode reaches the fleet API with ``httpx.Client(verify=..., timeout=...)``
(``flwr.supercore.protobuf.client``), whose default ``trust_env=True`` honours ``HTTPS_PROXY``/``HTTP_PROXY``/
``ALL_PROXY`` and ``NO_PROXY``: TLS to the server is tunnelled through the proxy's HTTP CONNECT, end to end. So
``--proxy`` is passed as those variables in the SuperNode's environment, with the loopback names added to
``NO_PROXY`` so the SuperNode's own local Runtime API (plain HTTP on 127.0.0.1) never goes through the proxy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from fedseg.common.errors import ConfigError

#: Hosts that never go through the proxy: the SuperNode's local Runtime API and fedseg's gate.
LOOPBACK_NO_PROXY = ("localhost", "127.0.0.1", "::1")


def check_proxy(url: str) -> str:
    """Return ``url`` (``http://[user:pass@]HOST:PORT``) or raise a one-line :class:`ConfigError`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"--proxy must look like http://HOST:PORT, got {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"--proxy must look like http://HOST:PORT (e.g. http://proxy.hospital.lan:3128), got {url!r}")
    return url.rstrip("/")


def env_proxy(environ: Mapping[str, str] | None = None) -> str | None:
    """The proxy the environment names for HTTPS (``HTTPS_PROXY``, then ``https_proxy``, ``ALL_PROXY``), if any."""
    environ = os.environ if environ is None else environ
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if environ.get(name):
            return environ[name]
    return None


def proxy_env(proxy: str | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment entries that send the SuperNode's fleet traffic through ``proxy`` (empty when None).

    ``NO_PROXY`` keeps what the environment has and gains the loopback names.
    """
    if proxy is None:
        return {}
    environ = os.environ if environ is None else environ
    existing = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    names = [n.strip() for n in existing.split(",") if n.strip()]
    names += [n for n in LOOPBACK_NO_PROXY if n not in names]
    no_proxy = ",".join(names)
    return {
        "HTTPS_PROXY": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "http_proxy": proxy,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def bypasses(host: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``NO_PROXY`` exempts ``host`` (exact names, ``.domain`` suffixes, ``*``)."""
    environ = os.environ if environ is None else environ
    for name in (environ.get("NO_PROXY") or environ.get("no_proxy") or "").split(","):
        name = name.strip().lower()
        if name == "*" or (
            name and (host.lower() == name.lstrip(".") or host.lower().endswith("." + name.lstrip(".")))
        ):
            return True
    return False
