"""Reading the server's configuration: a ``server.toml`` plus ``key=value`` overrides, merged, made absolute
relative to the file, validated once into :class:`~fedseg.server.config.ServerConfig`, and its files checked."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedseg.common.data.manifest import load_manifest
from fedseg.common.errors import ConfigError, format_validation_error
from fedseg.server.config import ServerConfig, TLSConfig


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["rounds=5", "train.lr=1e-3", 'strategy.name="fedprox"']`` into a nested dict.

    Values are read as TOML values (numbers, booleans, arrays, quoted strings); anything that is not valid
    TOML is taken as a plain string, so ``strategy.name=fedprox`` works too.

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like key=value, e.g. rounds=5 or train.lr=1e-4")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[leaf] = value
    return nested


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``overrides`` into a copy of ``base`` (override wins)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file into a dict.

    Raises:
        ConfigError: the file is missing or not valid TOML.
    """
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing server.toml with --config")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid TOML ({err})") from None


def build_config(raw: dict[str, Any], base_dir: Path, source: str) -> ServerConfig:
    """Validate a raw dict and make every path absolute against ``base_dir``.

    Args:
        raw: the parsed TOML merged with overrides.
        base_dir: folder that relative paths are relative to.
        source: what to name in error messages (the file, or "overrides").

    Raises:
        ConfigError: a value is invalid (one line naming the field) or a referenced file is missing.
    """
    try:
        cfg = ServerConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation_error(err)}") from None
    cfg = absolute_paths(cfg, base_dir)
    check_files(cfg, source)
    return cfg


def load_server_config(path: Path | None, overrides: Sequence[str] = ()) -> ServerConfig:
    """Load ``path`` (or the defaults when ``None``), apply overrides, validate and resolve paths.

    Raises:
        ConfigError: the file or an override is invalid; the message names the field and the file.
    """
    raw = read_toml(path) if path is not None else {}
    raw = merge(raw, parse_overrides(overrides))
    base = path.resolve().parent if path is not None else Path.cwd()
    return build_config(raw, base, str(path) if path is not None else "overrides")


def _absolute(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def manifest_ref(value: str | None, base: Path) -> str | None:
    """A manifest reference with a relative file path made absolute; built-in names stay as they are."""
    if value is None:
        return None
    looks_like_file = "/" in value or Path(value).suffix.lower() in (".toml", ".json")
    if not looks_like_file and not (base / value).is_file():
        return value
    return str(_absolute(Path(value), base))


def absolute_paths(cfg: ServerConfig, base: Path) -> ServerConfig:
    """The same config with every path made absolute (the ServerApp runs in another working directory)."""
    val = cfg.validation
    validation = val.model_copy(update={"data": _absolute(val.data, base), "labels": manifest_ref(val.labels, base)})
    tls = None
    if cfg.tls is not None:
        tls = TLSConfig(
            ca=_absolute(cfg.tls.ca, base) or cfg.tls.ca,
            cert=_absolute(cfg.tls.cert, base) or cfg.tls.cert,
            key=_absolute(cfg.tls.key, base) or cfg.tls.key,
        )
    return cfg.model_copy(
        update={
            "output_dir": _absolute(cfg.output_dir, base),
            "database": _absolute(cfg.database, base),
            "sites_file": _absolute(cfg.sites_file, base),
            "validation": validation,
            "tls": tls,
        }
    )


def check_files(cfg: ServerConfig, source: str) -> None:
    """Raise ConfigError naming the key when a referenced input file or folder does not exist."""
    needed: list[tuple[str, Path | None]] = [("validation.data", cfg.validation.data)]
    if cfg.tls is not None:
        needed += [("tls.ca", cfg.tls.ca), ("tls.cert", cfg.tls.cert), ("tls.key", cfg.tls.key)]
    for key, path in needed:
        if path is not None and not path.exists():
            raise ConfigError(f"{source}: {key} = {path} does not exist")
    if cfg.validation.labels is not None:
        load_manifest(cfg.validation.labels)  # raises a one-line ConfigError naming the manifest
