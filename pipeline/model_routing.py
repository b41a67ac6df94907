"""Which model contours an ROI: the active registered model for its name and modality, else the configuration.

A model row active for (roi_regex, modality) serves an ROI whose name fully matches the regex
(case-insensitive; '' = every ROI) and whose series has that modality ('' = any). When several
match, the most specific wins (regex and modality, then regex, then modality, then neither), then
the most recently activated. No match: the configuration's `propagation` section, named after the
weight-free backend (`classic`, the registry's built-in model) when it resolves to it and
`config-default` otherwise. Backends are known only through models/backends.py. Jobs (pipeline/runner.py), the nightly batch and `rtprop models evaluate` route here.

The checkpoint of a registered model is checked against the sha256 recorded at registration
before every use (`verified_settings`) and against what the loader actually read (`check_loaded`):
a file changed on disk after registration is refused, never used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config, PropagationConfig
from db.schema import Model, Series, aware
from models import backends
from models.checkpoint_file import CheckpointError, sha256_of

CONFIG_DEFAULT = "config-default"


def builtin_name() -> str:
    """The registry's built-in model: the weight-free backend, by its name (never retired, never re-registered)."""
    return backends.weight_free().name


@dataclass(frozen=True)
class RoutedModel:
    """The model chosen for one ROI: its registry name, backend, checkpoint sha256 ('' = none) and settings."""

    name: str
    backend: str
    sha256: str
    settings: PropagationConfig

    def describe(self) -> dict[str, str]:
        return {"model": self.name, "backend": self.backend, "checkpoint_sha256": self.sha256}

    @property
    def queue(self) -> str:
        """The job engine's queue its jobs go to: `gpu` for a backend that wants one, else `cpu`."""
        return "gpu" if backends.get(self.backend).wants_gpu else "cpu"


def model_settings(row: Model, config: Config) -> RoutedModel:
    """The propagation settings that run registered model `row` (the configuration's, with its backend and weights)."""
    spec = backends.get(row.backend, key=f"model {row.name!r}: backend")
    path = None
    if spec.needs_weights:  # relative to the storage root when registered under it (a moved storage still works)
        path = Path(row.path)
        path = path if path.is_absolute() else config.storage.root / path
    settings = spec.with_weights(config.propagation, path, row.model_cfg, row.image_size)
    return RoutedModel(row.name, spec.name, row.sha256 if spec.needs_weights else "", settings)


def default_model(config: Config) -> RoutedModel:
    """What runs when no registered model is active for an ROI: the configuration as it stands."""
    spec = backends.choose(config.propagation)
    return RoutedModel(CONFIG_DEFAULT if spec.needs_weights else spec.name, spec.name, "", config.propagation)


def scope_matches(row: Model, roi_name: str, modality: str) -> bool:
    if row.modality and row.modality.upper() != (modality or "").upper():
        return False
    return not row.roi_regex or re.fullmatch(row.roi_regex, roi_name.strip(), re.IGNORECASE) is not None


def active_row(session: Session, roi_name: str, modality: str) -> Model | None:
    """The active model row serving (roi_name, modality), most specific scope first; None = the default."""
    rows = session.execute(select(Model).where(Model.state == "active")).scalars().all()
    matching = [r for r in rows if scope_matches(r, roi_name, modality)]
    if not matching:
        return None
    return max(matching, key=lambda r: (bool(r.roi_regex) and bool(r.modality), bool(r.roi_regex), bool(r.modality),
                                        aware(r.activated_at) or aware(r.added_at), r.id))


def settings_for(factory: sessionmaker[Session], config: Config, roi_name: str, modality: str) -> RoutedModel:
    """The model (and its PropagationConfig in `.settings`) that contours `roi_name` on a `modality` series."""
    with factory() as session:
        row = active_row(session, roi_name, modality)
        return model_settings(row, config) if row is not None else default_model(config)


def job_queue(session: Session, config: Config, structures: list[str], series_uid: str) -> str:
    """The engine queue of a job contouring `structures` on series `series_uid`: `gpu` when a model routed
    to one of them wants a GPU, else `cpu` (decided when its prompts are found, pipeline/discovery.py,
    and kept on the job)."""
    modality = session.execute(select(Series.modality).where(
        Series.series_instance_uid == series_uid)).scalar() or ""
    routed = [model_settings(row, config) if (row := active_row(session, s, modality)) is not None
              else default_model(config) for s in structures]
    return "gpu" if any(r.queue == "gpu" for r in routed) else "cpu"


class CheckpointChangedError(CheckpointError):
    """A registered model's checkpoint file is no longer the one registered: refused, never scored."""


def verified_settings(routed: RoutedModel) -> PropagationConfig:
    """`routed.settings`, after checking its checkpoint is still the file registered (CheckpointChangedError if
    not; CheckpointError if it is missing)."""
    if routed.sha256 and routed.settings.checkpoint is not None:
        path = Path(routed.settings.checkpoint)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path.name} of model {routed.name!r} is missing from {path.parent}")
        digest = sha256_of(path)
        if digest != routed.sha256:
            raise CheckpointChangedError(
                f"checkpoint {path.name} in {path.parent} of model {routed.name!r} changed after registration "
                f"(sha256 {digest[:12]}..., registered {routed.sha256[:12]}...): refused; register the new file as a "
                "new model")
    return routed.settings


def check_loaded(routed: RoutedModel, loaded_sha256: str | None) -> None:
    """The weights the loader read (`PropagationResult.checkpoint_sha256`) are the registered ones: the file
    could change between `verified_settings` and the load."""
    if routed.sha256 and loaded_sha256 != routed.sha256:
        raise CheckpointError(f"model {routed.name!r}: the loaded checkpoint has sha256 "
                              f"{(loaded_sha256 or 'none')[:12]}..., registered {routed.sha256[:12]}...: "
                              "result discarded")
