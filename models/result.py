"""What every propagator returns, and the signature every backend has.

A leaf of `models/`: it imports only the prompts and the configuration schema, so `propagate`,
`classic` and `sam2_backend` can all import it without a cycle.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    warnings: list[str] = field(default_factory=list)  # why the result looks implausible; empty = plausible
    # [0, 1]: how good the whole structure is likely to be (models/confidence.py; bench/quality.py calibrates it
    # against Dice). Set by models.propagate.propagate for every backend; None before that.
    structure_confidence: float | None = None


class Backend(Protocol):
    """A propagator: prompts on one or more slices of `image` (z, y, x, raw values) in, a 3D mask out.

    `prompts` come in the caller's order, checked by `models.prompts.check_prompts` (a backend merges
    them per slice with it); spacing is in mm, array order; modality "CT", "MR" or "" (unknown).
    """

    def __call__(self, image: np.ndarray, spacing_zyx: tuple[float, float, float], prompts: Sequence[Prompt],
                 modality: str, settings: PropagationConfig) -> PropagationResult: ...
