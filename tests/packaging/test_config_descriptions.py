"""Every field of server.toml, policy.toml and labels.toml says what it is: the generated references are built from
these descriptions, so a field without one would be a hole in the docs."""

from __future__ import annotations

import types
from typing import Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from fedseg.client.policy import SitePolicy
from fedseg.common.data.manifest import LabelManifest
from fedseg.server.config import ServerConfig


def undocumented(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``model`` (and of its nested models) without a description."""
    missing = []
    for name, field in model.model_fields.items():
        nested = [t for t in _types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            missing += [m for sub in nested for m in undocumented(sub, f"{prefix}{name}.")]
        elif not field.description:
            missing.append(prefix + name)
    return missing


def _types(annotation: object) -> tuple[object, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


@pytest.mark.parametrize("model", [ServerConfig, SitePolicy, LabelManifest], ids=lambda m: m.__name__)
def test_every_config_field_has_a_description(model: type[BaseModel]) -> None:
    assert undocumented(model) == []


def test_the_check_sees_a_missing_description() -> None:
    class Inner(BaseModel):
        documented: int = 0

    class Outer(BaseModel):
        inner: Inner | None = None

    assert undocumented(Outer) == ["inner.documented"]
