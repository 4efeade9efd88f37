"""Helpers for client tests: the node-config ``fed-client join`` gives the ClientApp for the phantom site."""

from __future__ import annotations

from pathlib import Path

from flwr.app.user_config import UserConfig
from flwr.common.config import parse_config_args

from fedseg.client.site import SiteConfig, write_node_config


def phantom_node_config(phantom_root: Path, workdir: Path, **caps: float) -> UserConfig:
    """The node-config of ``site-1`` of ``phantom_root`` working in ``workdir``, with site-policy ``caps``."""
    site = SiteConfig(
        site="site-1",
        data=phantom_root / "site-1",
        labels=str(phantom_root / "site-1" / "labels.toml"),
        workdir=workdir,
        **caps,  # type: ignore[arg-type]
    )
    return parse_config_args([str(write_node_config(site, workdir / "node.toml"))])
