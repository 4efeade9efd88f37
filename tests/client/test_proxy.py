"""--proxy: the URL is checked at the edge and becomes HTTPS_PROXY (with loopback in NO_PROXY) for the SuperNode."""

from __future__ import annotations

import httpx
import pytest

from fedseg.client.proxy import bypasses, check_proxy, env_proxy, proxy_env
from fedseg.common.errors import ConfigError


@pytest.mark.parametrize(
    "bad", ["proxy:3128", "ftp://p:21", "http://p", "http://:3128", "http://p:99999", "http://p:1/x"]
)
def test_a_bad_proxy_url_is_one_line_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="--proxy must look like http://HOST:PORT") as err:
        check_proxy(bad)
    assert "\n" not in str(err.value)


def test_proxy_env_names_the_proxy_and_keeps_loopback_direct() -> None:
    env = proxy_env("http://10.0.0.1:3128", {"NO_PROXY": "intranet.lan"})
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://10.0.0.1:3128"
    assert env["NO_PROXY"].split(",") == ["intranet.lan", "localhost", "127.0.0.1", "::1"]
    assert proxy_env(None) == {}


def test_env_proxy_and_no_proxy() -> None:
    assert env_proxy({"https_proxy": "http://p:1"}) == "http://p:1"
    assert env_proxy({}) is None
    assert bypasses("fed.example.org", {"NO_PROXY": ".example.org"})
    assert not bypasses("fed.example.com", {"NO_PROXY": ".example.org"})


def test_httpx_as_flower_builds_it_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's fleet client is ``httpx.Client(verify=..., timeout=...)``: trust_env on, so HTTPS_PROXY is used."""
    for name, value in proxy_env("http://127.0.0.1:3128", {}).items():
        monkeypatch.setenv(name, value)
    client = httpx.Client(verify=True, timeout=30.0, follow_redirects=True)
    remote = client._transport_for_url(httpx.URL("https://fed.example.org:9092/v1/fleet/x"))
    local = client._transport_for_url(httpx.URL("http://127.0.0.1:9094/x"))
    assert remote is not client._transport and local is client._transport
