"""Masks -> the RTSTRUCT a result may leave the node as: named, typed and coloured for the TPS, with its
review side file, and checked by reading it back.

The job's computation (pipeline/compute.py) and the re-contouring of the nightly batch, the demo and
`rtprop recontour` (pipeline/recontour.py) all write through `write_result`, so whatever is handed to
the one exit (pipeline/delivery.py `deliver`) went through the same TPS profile (converters/tps.py)
and the same file check (pipeline/file_check.py).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from config.schema import Config
from converters.files import write_atomic
from converters.geometry import Volume
from pipeline.compute_types import CheckSummary
from pipeline.file_check import check_file

REVIEW_FILE = "review.json"  # beside the RTSTRUCT: what the web review page shows per structure


@dataclass(frozen=True)
class Structure:
    """One propagated structure to write."""

    name: str  # the structure's name (the TPS profile and the suffix are applied when written)
    mask: np.ndarray  # (z, y, x) bool on the volume's grid
    prompt: str  # what it was propagated from, e.g. "box on slice 12"
    backend: str
    warnings: tuple[str, ...] = ()  # the guard's reasons it looks implausible
    confidence: tuple[float, ...] = ()  # per slice
    slice: int = 0  # its (first) prompted slice
    slices: tuple[int, ...] = ()  # every prompted slice
    structure_confidence: float | None = None  # the calibrated whole-structure confidence (models/confidence.py)


@dataclass(frozen=True)
class WrittenResult:
    path: Path
    sha256: str
    sop_instance_uid: str
    rois: tuple[str, ...]  # the written ROI names, in the order of the structures
    check: CheckSummary
    timings_s: dict[str, float]  # write_s, file_check_s


def roi_description(backend: str, prompt: str, warnings: Sequence[str]) -> str:
    """A result ROI's ROIDescription (LO, 64 characters): a flagged result leads with the warning a TPS shows."""
    return f"CHECK: {'; '.join(warnings)}" if warnings else f"rtprop {backend} from {prompt}"


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_result(volume: Volume, structures: Sequence[Structure], out: Path, config: Config, *,
                 series_description: str, uid_seed: str | None = None) -> WrittenResult:
    """Write `structures` as one RTSTRUCT at `out` (a folder: RS_<SOPInstanceUID>.dcm in it), its review
    side file beside it, and file check it against the masks and the series (`check.ok` False: it must
    not leave the node)."""
    from converters.rtstruct_write import RoiMask, write_rtstruct
    from converters.tps import output_style

    t = time.perf_counter()
    rois = []
    for s in structures:
        style = output_style(s.name, config.rtstruct, implausible=bool(s.warnings))
        rois.append(RoiMask(style["name"], s.mask, color=style["color"], interpreted_type=style["interpreted_type"],
                            description=roi_description(s.backend, s.prompt, s.warnings)))
    out = Path(out)
    (out if out.suffix.lower() != ".dcm" else out.parent).mkdir(parents=True, exist_ok=True)
    path = write_rtstruct(volume, rois, out, config.rtstruct, series_description=series_description,
                          uid_seed=uid_seed)
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "StructureSetROISequence"])
    names = tuple(str(item.ROIName) for item in ds.get("StructureSetROISequence", []))
    write_atomic(path.parent / REVIEW_FILE, json.dumps({"rtstruct": path.name, "structures": [
        {"structure": s.name, "roi": roi, "slice": s.slice, "slices": list(s.slices), "warnings": list(s.warnings),
         **({} if s.structure_confidence is None else {"structure_confidence": round(s.structure_confidence, 3)}),
         "confidence": [round(float(c), 3) for c in s.confidence]} for s, roi in zip(structures, names)]}).encode())
    timings = {"write_s": time.perf_counter() - t}
    t = time.perf_counter()
    check = check_file(path, volume, [s.mask for s in structures], config.pipeline.file_check_min_dice)
    timings["file_check_s"] = time.perf_counter() - t
    return WrittenResult(path, sha256_file(path), str(ds.SOPInstanceUID), names,
                         CheckSummary(check.ok, dict(check.dice), check.min_dice, tuple(check.problems)), timings)
