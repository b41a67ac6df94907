"""The one propagator interface: a volume and a prompt on one slice in, a 3D mask out.

`models/` knows nothing of DICOM: arrays, spacing and prompts in, masks out. Every caller (CLI,
pipeline, batch) goes through `propagate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config.schema import PropagationConfig
from models.prompts import Prompt


@dataclass
class PropagationResult:
    mask: np.ndarray  # (z, y, x) bool, same shape as the input image
    confidence: np.ndarray  # (z,) float in [0, 1]; 0 on slices the structure does not reach
    backend: str  # "classic" or "sam2": the backend that actually ran
    checkpoint_sha256: str | None = None  # of the loaded checkpoint file (sam2 only), for the audit
    details: dict[str, Any] = field(default_factory=dict)  # timings, stop reasons per direction, ...


def choose_backend(settings: PropagationConfig) -> str:
    """`auto` means SAM2 when a checkpoint is configured, else the weight-free classic backend."""
    if settings.backend != "auto":
        return settings.backend
    return "sam2" if settings.checkpoint is not None else "classic"


def propagate(
    image: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    prompt: Prompt,
    modality: str = "",
    settings: PropagationConfig | None = None,
) -> PropagationResult:
    """Spread `prompt` from its slice through `image` (z, y, x) with the configured backend."""
    settings = settings or PropagationConfig()
    backend = choose_backend(settings)
    if backend == "sam2":
        from models import sam2_backend

        return sam2_backend.propagate(image, spacing_zyx, prompt, modality, settings)
    from models import classic

    return classic.propagate(image, spacing_zyx, prompt, modality, settings)
