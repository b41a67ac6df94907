"""Image geometry and the in-memory volume every stage passes around.

Axis conventions (one place, so nobody guesses):
- `Volume.array` is indexed (z, y, x) = (slice, row, column), as SimpleITK's GetArrayFromImage gives.
- `Geometry.spacing_mm` and `Geometry.origin_mm` are in SimpleITK order (x, y, z), patient LPS mm.
- `Geometry.direction` is SimpleITK's row-major 3x3: column c is the patient direction of index axis c
  (c=0 along columns/x, c=1 along rows/y, c=2 along slices/z). For DICOM, columns 0 and 1 come from
  ImageOrientationPatient and column 2 is the slice normal, sign chosen so slice index grows with
  position along the normal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in patient space: origin of voxel (0,0,0), spacing and direction (SimpleITK order)."""

    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    shape_zyx: tuple[int, int, int] = (0, 0, 0)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array order (z, y, x), for metrics and filters working on `Volume.array`."""
        x, y, z = self.spacing_mm
        return (z, y, x)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous indices (..., 3) in (x, y, z) = (col, row, slice) order -> patient mm (..., 3)."""
        ijk = np.asarray(ijk, dtype=float)
        return np.asarray(self.origin_mm) + (ijk * np.asarray(self.spacing_mm)) @ self.direction_matrix.T

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Patient mm (..., 3) -> continuous indices (..., 3) in (col, row, slice) order."""
        xyz = np.asarray(xyz, dtype=float) - np.asarray(self.origin_mm)
        return (xyz @ np.linalg.inv(self.direction_matrix).T) / np.asarray(self.spacing_mm)


@dataclass
class Volume:
    """A 3D image with its geometry and, when it came from DICOM, the identities of its slices."""

    array: np.ndarray  # (z, y, x); CT in HU after Rescale Slope/Intercept
    geometry: Geometry
    modality: str = ""  # "CT", "MR", or "" when unknown (e.g. a NIfTI file)
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    sop_class_uid: str = ""
    sop_instance_uids: list[str] = field(default_factory=list)  # one per slice, index order
    files: list[Path] = field(default_factory=list)  # one per slice, index order (DICOM only)
    # The first slice's header (a pydicom Dataset read without pixel data; DICOM only, else None).
    # The RTSTRUCT writer copies the patient, study and equipment attributes from it.
    header: Any = None
