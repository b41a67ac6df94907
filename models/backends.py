"""The propagators rtprop knows, each registered once here: nothing else in the tree names a backend.

A new propagator is one module with a `propagate` function (the `Backend` signature of
models/result.py) and one `register(...)` line below. Each entry says what the rest of the node
needs to know about a backend without importing it (torch and sam2 load only when one first runs):

- `needs_weights`: it runs from a checkpoint file (`propagation.checkpoint`, or a registered model);
  `auto` picks it when a checkpoint is configured, and `rtprop models add` registers files for it.
  Its module then also has `with_weights(settings, checkpoint, architecture, image_size)` (the
  settings that run a registered checkpoint) and `check_weights(path, settings)` (raises
  `CheckpointError` when the file cannot be loaded as this backend's model).
- `wants_gpu`: its jobs go to the job engine's `gpu` queue (one at a time per GPU worker), the
  others to `cpu`; the queue follows the model routed to each ROI (pipeline/model_routing.py).
- `tracker`: "module:function" that follows a first-frame mask through cine frames (models/tracking.py).
- `corrector`: "module:function" that applies a reviewer's corrections its own way (models/corrections.py
  `correct` signature plus `previous`); none: the corrections go to `propagate(..., corrections=...)`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.errors import UserError
from config.schema import PropagationConfig
from models.result import Backend

AUTO = "auto"  # propagation.backend: the weights backend when a checkpoint is set, else the weight-free one


class UnknownBackendError(UserError):
    """A backend name that is not registered; the message names the setting and the known backends."""


@dataclass(frozen=True)
class BackendSpec:
    """One registered propagator (see the module docstring for each field)."""

    name: str
    module: str
    needs_weights: bool = False
    wants_gpu: bool = False
    tracker: str = ""
    corrector: str = ""
    packages: tuple[str, ...] = ()  # Python distributions whose versions are recorded with each result

    def _attr(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module), name)

    def propagate(self) -> Backend:
        """Its propagate function, imported on first use."""
        return self._attr("propagate")

    def track(self) -> Callable[..., dict[str, Any]]:
        return _function(self.tracker)

    def correct(self) -> Callable[..., Any] | None:
        """Its own way of applying corrections (see the module docstring), or None."""
        return _function(self.corrector) if self.corrector else None

    def with_weights(self, settings: PropagationConfig, checkpoint: Path | None, architecture: str = "",
                     image_size: int | None = None) -> PropagationConfig:
        """`settings` running this backend: from `checkpoint` (with its architecture and input size) if it
        needs weights, else as they are."""
        if not self.needs_weights or checkpoint is None:
            return settings.model_copy(update={"backend": self.name})
        return self._attr("with_weights")(settings, checkpoint, architecture, image_size)

    def check_weights(self, path: Path, settings: PropagationConfig) -> None:
        """Raise CheckpointError unless `path` loads as this backend's model under `settings`."""
        if self.needs_weights:
            self._attr("check_weights")(path, settings)


def _function(where: str) -> Callable[..., Any]:
    module, function = where.split(":")
    return getattr(importlib.import_module(module), function)


_REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> BackendSpec:
    if spec.name == AUTO or spec.name in _REGISTRY:
        raise ValueError(f"backend {spec.name!r} is already registered (or reserved)")
    _REGISTRY[spec.name] = spec
    return spec


# The first weight-free backend is the default model (the registry's built-in row is named after it).
register(BackendSpec("classic", "models.classic", tracker="models.tracking:track_classic",
                     corrector="models.corrections:correct_incrementally"))
register(BackendSpec("sam2", "models.sam2_backend", needs_weights=True, wants_gpu=True,
                     tracker="models.tracking:track_sam2", packages=("sam2", "torch")))


def packages() -> tuple[str, ...]:
    """The Python distributions of every registered backend, once each."""
    return tuple(dict.fromkeys(p for s in _REGISTRY.values() for p in s.packages))


def names() -> tuple[str, ...]:
    """Every registered backend name (the values `propagation.backend` takes besides `auto`)."""
    return tuple(_REGISTRY)


def get(name: str, key: str = "propagation.backend") -> BackendSpec:
    """The backend `name`; UnknownBackendError naming `key` and the registered backends otherwise."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise UnknownBackendError(f"{key}: unknown backend {name!r} (registered: {', '.join(names())}, or {AUTO})")
    return spec


def weight_free() -> BackendSpec:
    """The default backend: the first one registered that needs no weights."""
    return next(s for s in _REGISTRY.values() if not s.needs_weights)


def weighted() -> BackendSpec:
    """The backend a checkpoint is for when nothing names one (`auto` with a checkpoint, `models add`)."""
    return next(s for s in _REGISTRY.values() if s.needs_weights)


def choose(settings: PropagationConfig, *, has_weights: bool | None = None) -> BackendSpec:
    """The backend `settings` run: the one named, or for `auto` the weights backend when a checkpoint
    is set (`has_weights` overrides that test, e.g. for a model handed in already loaded), else the
    weight-free one."""
    if settings.backend != AUTO:
        return get(settings.backend)
    has_weights = settings.checkpoint is not None if has_weights is None else has_weights
    return weighted() if has_weights else weight_free()


def check_settings(settings: PropagationConfig) -> PropagationConfig:
    """A loaded configuration's backend is registered (UnknownBackendError naming the key otherwise)."""
    if settings.backend != AUTO:
        get(settings.backend)
    return settings
