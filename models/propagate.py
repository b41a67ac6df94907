"""The one propagator interface: a volume and prompts on one or more slices in, a 3D mask out.

`models/` knows nothing of DICOM: arrays, spacing and prompts in, masks out. Every caller (CLI,
pipeline, batch) goes through `propagate`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from config.schema import PropagationConfig
from models import guard
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, Prompt, check_prompts
from models.result import Backend, PropagationResult


def choose_backend(settings: PropagationConfig) -> str:
    """`auto` means SAM2 when a checkpoint is configured, else the weight-free classic backend."""
    if settings.backend != "auto":
        return settings.backend
    return "sam2" if settings.checkpoint is not None else "classic"


def backend_function(name: str) -> Backend:
    """The propagate function of backend `name` ("sam2" or "classic"), imported on first use."""
    if name == "sam2":
        from models import sam2_backend

        return sam2_backend.propagate
    from models import classic

    return classic.propagate


def propagate(
    image: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    prompts: Prompt | Sequence[Prompt],
    modality: str = "",
    settings: PropagationConfig | None = None,
) -> PropagationResult:
    """Spread `prompts` (one prompt, or several on one or more slices) through `image` (z, y, x).

    The result's `warnings` hold the guard's reasons it looks implausible (models/guard.py), for
    either backend.
    """
    settings = settings or PropagationConfig()
    image = np.asarray(image)
    checked = check_prompts(image.shape, spacing_zyx, prompts)
    given = (prompts,) if isinstance(prompts, (BoxPrompt, PointPrompt, MaskPrompt)) else tuple(prompts)
    # the backend gets the prompts in the caller's order: with clicks only, the first one starts (classic)
    result = backend_function(choose_backend(settings))(image, spacing_zyx, given, modality, settings)
    result.warnings = guard.assess(image, spacing_zyx, checked, result, modality)
    return result
