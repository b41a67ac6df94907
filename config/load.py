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

from config.errors import UserError
from config.schema import Config

ENV_PREFIX = "RTPROP__"


class ConfigError(UserError):
    """The configuration file or an override is invalid; the message names the key."""


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override {'.'.join(keys)}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def env_overrides(environ: Mapping[str, str], names: dict[str, str] | None = None) -> dict[str, Any]:
    """The nested mapping spelled by RTPROP__* environment variables (`names`: dotted key -> variable)."""
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
        if names is not None:
            names[".".join(keys)] = name
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(exc: ValidationError, source: str, env_names: dict[str, str], flags: set[str]) -> str:
    """One line per bad key, saying where the value came from: the file, a variable or a flag."""
    lines = ["invalid configuration:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        keys = (key, *_parents(key))
        if any(k in flags for k in keys) or any(f.startswith(key + ".") for f in flags):
            origin = "a command-line flag"
        else:
            origin = next((f"environment variable {env_names[k]}" for k in keys if k in env_names), None) or next(
                (f"environment variable {v}" for k, v in env_names.items() if k.startswith(key + ".")), source)
        lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r}; from {origin})")
    return "\n".join(lines)


def _where(exc: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error (yaml's own marks name no file: the text was read first)."""
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out |= _leaves(value, dotted + ".") if isinstance(value, Mapping) and value else {dotted}
    return out


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Read `path` (optional), then RTPROP__* variables, then `overrides` (CLI flags); validate."""
    data: dict[str, Any] = {}
    source = "the defaults"
    if path is not None:
        path = Path(path)
        source = f"configuration file {path}"
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {path} is not valid YAML{_where(exc)}: "
                              f"{getattr(exc, 'problem', None) or exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {path} must hold a mapping at the top level")
        data = loaded or {}
    env_names: dict[str, str] = {}
    data = _merge(data, env_overrides(os.environ if environ is None else environ, env_names))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, env_names, _leaves(overrides or {}))) from exc


def resolve_storage(config: Config) -> Config:
    """Make every path of the storage, drop-in and batch sections absolute under `storage.root`.

    Done once, here, so every subcommand given the same `--storage` sees the same folders.
    """
    root = config.storage.root.expanduser().resolve()

    def under_root(p: Path) -> Path:
        return p if p.is_absolute() else root / p

    key = config.storage.pseudonym_key_file
    config.storage = config.storage.model_copy(update={
        "root": root, "pseudonym_key_file": None if key is None else under_root(key),
        **{name: under_root(getattr(config.storage, name)) for name in ("archive", "quarantine", "outbox", "database")}})
    config.dropin = config.dropin.model_copy(update={
        name: under_root(getattr(config.dropin, name)) for name in ("inbox", "done", "quarantine", "outbox")})
    config.batch = config.batch.model_copy(update={"out": under_root(config.batch.out)})
    return config
