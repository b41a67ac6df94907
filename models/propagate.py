"""The one propagator interface: a volume and prompts on one or more slices in, a 3D mask out.

`models/` knows nothing of DICOM: arrays, spacing and prompts in, masks out. Every caller (CLI,
pipeline, batch) goes through `propagate`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from config.schema import PropagationConfig
from models import backends, confidence, guard
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, Prompt, check_prompts
from models.result import Backend, PropagationResult


def choose_backend(settings: PropagationConfig) -> str:
    """The name of the backend `settings` run (`auto`: the weights backend when a checkpoint is configured,
    else the weight-free one); see models/backends.py."""
    return backends.choose(settings).name


def backend_function(name: str) -> Backend:
    """The propagate function of the registered backend `name`, imported on first use."""
    return backends.get(name).propagate()


def propagate(
    image: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    prompts: Prompt | Sequence[Prompt],
    modality: str = "",
    settings: PropagationConfig | None = None,
) -> PropagationResult:
    """Spread `prompts` (one prompt, or several on one or more slices) through `image` (z, y, x).

    The result's `structure_confidence` says how good it is likely to be (models/confidence.py), and its
    `warnings` hold the guard's reasons it looks implausible (models/guard.py), for either backend.
    """
    settings = settings or PropagationConfig()
    image = np.asarray(image)
    checked = check_prompts(image.shape, spacing_zyx, prompts)
    given = (prompts,) if isinstance(prompts, (BoxPrompt, PointPrompt, MaskPrompt)) else tuple(prompts)
    # the backend gets the prompts in the caller's order: with clicks only, the first one starts (classic)
    result = backend_function(choose_backend(settings))(image, spacing_zyx, given, modality, settings)
    result.structure_confidence, result.details["confidence_signals"] = confidence.structure_confidence(
        image, spacing_zyx, checked, result, modality)
    # a slice is no surer than its structure (the backend's own per-slice values are kept in the details)
    result.details["backend_confidence"] = [round(float(c), 3) for c in result.confidence]
    result.confidence = np.minimum(np.asarray(result.confidence, dtype=np.float32), result.structure_confidence)
    result.warnings = guard.assess(image, spacing_zyx, checked, result, modality)
    return result
