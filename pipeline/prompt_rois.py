"""Which ROIs of an incoming RTSTRUCT are prompts: the conventions a planner follows in the TPS.

(docs/pipeline.md; configurable in `pipeline:`)
- An ROI whose contours all lie on ONE slice is a prompt for a structure of the same name. With
  `prompt_mode: box` (default) the prompt is the rectangle bounding its contour points, so a
  rectangle drawn in the TPS is used exactly; with `prompt_mode: mask` the drawn outline itself.
- POINT ROIs (ContourGeometricType POINT) whose name ends with the positive marker ("GTV+") or the
  negative marker ("GTV-") are clicks for the structure named without the marker ("GTV"). Points
  must share one slice (the positive points' slice; others are ignored and noted).
- Re-contour mode (`recontour_roi_regex`): a fully contoured ROI whose name matches the regex is
  re-propagated from its middle slice.
- One structure gets one prompt; a box/outline beats points for the same name (noted).
- Every other ROI is context and left alone.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from config.schema import PipelineConfig
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, Prompt, PromptError
from pipeline.prompts import prompt_from_roi

RECTANGLE_FILL = 0.95  # prompt_mode auto: an outline filling this much of its bounding rectangle is a box


@dataclass
class PromptSpec:
    """One structure to propagate, in a JSON-able form (what `jobs.prompts` records).

    `kind` box: `box` = [x0, y0, x1, y1] inclusive voxel indices (x columns, y rows) on `slice`;
    point: `points` = [[x, y, positive], ...]; mask: the outline of ROI `sources[0]` on `slice`.
    `mode` says how it was found: "prompt" (single-slice ROI / points) or "recontour".
    """

    structure: str
    kind: str
    slice: int
    sources: list[str]
    mode: str = "prompt"
    box: list[int] | None = None
    points: list[list[Any]] | None = None
    mask_voxels: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PromptSpec":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _strip_marker(name: str, cfg: PipelineConfig) -> tuple[str, bool] | None:
    """(structure, positive) for a point ROI name carrying a marker, else None (longer marker first)."""
    markers = sorted([(cfg.positive_point_marker, True), (cfg.negative_point_marker, False)],
                     key=lambda m: -len(m[0]))
    for marker, positive in markers:
        if marker and name.endswith(marker) and len(name) > len(marker):
            return name[: -len(marker)].strip(), positive
    return None


def _box_from_contours(roi, volume, z: int) -> list[int]:
    """Bounding rectangle of the ROI's contour points on slice z, as voxel indices, clipped to the image."""
    pts = np.concatenate([c for c, g in zip(roi.contours_mm, roi.geometric_types) if g != "POINT"])
    ijk = volume.geometry.patient_to_index(pts)
    ny, nx = volume.array.shape[1:]
    x0, x1 = (int(np.clip(round(float(v)), 0, nx - 1)) for v in (ijk[:, 0].min(), ijk[:, 0].max()))
    y0, y1 = (int(np.clip(round(float(v)), 0, ny - 1)) for v in (ijk[:, 1].min(), ijk[:, 1].max()))
    mask_rows = np.flatnonzero(roi.mask[z].any(axis=1))
    if x1 <= x0 or y1 <= y0:  # a degenerate outline: fall back on the rasterised extent
        mask_cols = np.flatnonzero(roi.mask[z].any(axis=0))
        x0, x1, y0, y1 = int(mask_cols[0]), int(mask_cols[-1]), int(mask_rows[0]), int(mask_rows[-1])
    return [x0, y0, x1, y1]


def find_prompts(structure_set, volume, pipeline: PipelineConfig) -> tuple[list[PromptSpec], list[str]]:
    """The prompts in `structure_set` (read on `volume`), and notes on every ROI not used and why."""
    notes: list[str] = []
    specs: dict[str, PromptSpec] = {}
    regex = re.compile(pipeline.recontour_roi_regex, re.IGNORECASE) if pipeline.recontour_roi_regex else None
    unmatched = {u.roi_number for u in structure_set.unmatched if u.geometric_type != "POINT"}
    point_groups: dict[str, dict[str, Any]] = {}

    for roi in structure_set.rois:
        if roi.points and all(g == "POINT" for g in roi.geometric_types):
            parsed = _strip_marker(roi.name, pipeline)
            if parsed is None:
                notes.append(f"POINT ROI {roi.name!r}: no +/- marker ({pipeline.positive_point_marker!r}/"
                             f"{pipeline.negative_point_marker!r}): ignored")
                continue
            structure, positive = parsed
            group = point_groups.setdefault(structure.lower(), {"structure": structure, "points": [], "sources": []})
            group["sources"].append(roi.name)
            for p in roi.points:
                if p.index_xyz is None:
                    continue
                group["points"].append((float(p.index_xyz[0]), float(p.index_xyz[1]), float(p.index_xyz[2]), positive))
            continue
        if roi.is_empty or roi.mask is None or not roi.mask.any():
            notes.append(f"ROI {roi.name!r}: no contour on this series: ignored")
            continue
        slices = np.flatnonzero(roi.mask.any(axis=(1, 2)))
        key = roi.name.strip().lower()
        if len(slices) == 1 and roi.number not in unmatched:
            if key in specs:
                notes.append(f"ROI {roi.name!r}: a second prompt for structure {roi.name!r}: ignored")
                continue
            z = int(slices[0])
            mode = pipeline.prompt_mode
            if mode == "auto":
                box = _box_from_contours(roi, volume, z)
                area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
                mode = "box" if roi.mask[z].sum() >= RECTANGLE_FILL * area else "mask"
            if mode == "mask":
                specs[key] = PromptSpec(roi.name.strip(), "mask", z, [roi.name], mask_voxels=int(roi.mask[z].sum()))
            else:
                specs[key] = PromptSpec(roi.name.strip(), "box", z, [roi.name], box=_box_from_contours(roi, volume, z))
        elif regex is not None and regex.fullmatch(roi.name.strip()):
            if key in specs:
                notes.append(f"ROI {roi.name!r}: structure already prompted: ignored")
                continue
            prompt = prompt_from_roi(roi.mask, "box" if pipeline.prompt_mode == "box" else "mask")
            spec = PromptSpec(roi.name.strip(), "mask" if isinstance(prompt, MaskPrompt) else "box",
                              prompt.slice_index, [roi.name], mode="recontour")
            if isinstance(prompt, BoxPrompt):
                spec.box = [prompt.x0, prompt.y0, prompt.x1, prompt.y1]
            else:
                spec.mask_voxels = int(prompt.mask.sum())
            specs[key] = spec
        else:
            notes.append(f"ROI {roi.name!r}: contoured on {len(slices)} slices, not a prompt"
                         + (" and not matching recontour_roi_regex" if regex else "") + ": left alone")

    for key, group in point_groups.items():
        positives = [p for p in group["points"] if p[3]]
        if not positives:
            notes.append(f"points for {group['structure']!r} ({', '.join(group['sources'])}): no positive point: ignored")
            continue
        if key in specs:
            notes.append(f"points for {group['structure']!r}: the structure has a drawn prompt, which is used")
            continue
        z = int(round(float(np.median([p[2] for p in positives]))))
        if not 0 <= z < volume.array.shape[0]:
            notes.append(f"points for {group['structure']!r}: slice {z} is outside the series: ignored")
            continue
        kept, spec_notes = [], []
        ny, nx = volume.array.shape[1:]
        for x, y, k, positive in group["points"]:
            if int(round(k)) != z:
                spec_notes.append(f"point ({x:.1f}, {y:.1f}) on slice {k:.1f}, not the prompt slice {z}: ignored")
                continue
            if not (0 <= round(x) < nx and 0 <= round(y) < ny):
                spec_notes.append(f"point ({x:.1f}, {y:.1f}) outside the image: ignored")
                continue
            kept.append([int(round(x)), int(round(y)), bool(positive)])
        specs[key] = PromptSpec(group["structure"], "point", z, group["sources"], points=kept, notes=spec_notes)
    return list(specs.values()), notes


def prompt_object(spec: PromptSpec, structure_set=None) -> Prompt:
    """The `models.prompts` object for `spec`; mask prompts take the outline from `structure_set`."""
    if spec.kind == "box":
        x0, y0, x1, y1 = spec.box or (None,) * 4
        return BoxPrompt(spec.slice, int(x0), int(y0), int(x1), int(y1))
    if spec.kind == "point":
        return PointPrompt(spec.slice, tuple((int(x), int(y), bool(s)) for x, y, s in spec.points or []))
    if spec.kind == "mask":
        if structure_set is None:
            raise PromptError(f"mask prompt for {spec.structure!r} needs the RTSTRUCT it was drawn in")
        roi = structure_set.roi(spec.sources[0])
        return MaskPrompt(spec.slice, np.asarray(roi.mask[spec.slice], dtype=bool).copy())
    raise PromptError(f"unknown prompt kind {spec.kind!r}")
