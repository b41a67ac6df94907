"""Load the YAML configuration, apply environment overrides, validate once at start-up.

Environment overrides: RTPROP__SECTION__KEY=value (double underscores between levels), e.g.
RTPROP__NODE__PORT=11113 or RTPROP__PROPAGATION__CHECKPOINT=/models/sam2.1_hiera_tiny.pt. Values are
parsed as YAML scalars/lists, so `RTPROP__NODE__ALLOWED_CALLING_AES='[TPS, ECLIPSE]'` works.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from config.schema import Config

ENV_PREFIX = "RTPROP__"


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message names the key."""


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override {'.'.join(keys)}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The nested mapping spelled by RTPROP__* environment variables."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment override {name}: not a valid value ({exc})") from exc
        _set_path(tree, keys, value)
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Read `path` (optional), then RTPROP__* variables, then `overrides` (CLI flags); validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {path} must hold a mapping at the top level")
        data = loaded or {}
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc


def resolve_storage(config: Config) -> Config:
    """Make every path of the storage, drop-in and batch sections absolute under `storage.root`.

    Done once, here, so every subcommand given the same `--storage` sees the same folders.
    """
    root = config.storage.root.expanduser().resolve()

    def under_root(p: Path) -> Path:
        return p if p.is_absolute() else root / p

    config.storage = config.storage.model_copy(update={
        "root": root, **{name: under_root(getattr(config.storage, name))
                         for name in ("archive", "quarantine", "outbox", "database")}})
    config.dropin = config.dropin.model_copy(update={
        name: under_root(getattr(config.dropin, name)) for name in ("inbox", "done", "quarantine", "outbox")})
    config.batch = config.batch.model_copy(update={"out": under_root(config.batch.out)})
    return config
