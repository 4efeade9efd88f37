"""Every field of server.toml, policy.toml and labels.toml says what it is: the generated references are built from
these descriptions, so a field without one would be a hole in the docs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from fedseg.client.policy import SitePolicy
from fedseg.common.data.manifest import LabelManifest
from fedseg.server.config import ServerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs"))

from reference import fields


def undocumented(model: type[BaseModel]) -> list[str]:
    """Dotted names of the fields of ``model`` (and of its nested models) without a description."""
    return [key for key, field in fields(model) if not field.description]


@pytest.mark.parametrize("model", [ServerConfig, SitePolicy, LabelManifest], ids=lambda m: m.__name__)
def test_every_config_field_has_a_description(model: type[BaseModel]) -> None:
    assert undocumented(model) == []


def test_the_check_sees_a_missing_description() -> None:
    class Inner(BaseModel):
        documented: int = 0

    class Outer(BaseModel):
        inner: Inner | None = None

    assert undocumented(Outer) == ["inner.documented"]
