"""Which ROIs of an incoming RTSTRUCT are prompts: the conventions a planner follows in the TPS.

(docs/pipeline.md; configurable in `pipeline:`)
- An ROI whose contours all lie on ONE slice is a prompt for a structure of the same name. With
  `prompt_mode: box` (default) the prompt is the rectangle bounding its contour points, so a
  rectangle drawn in the TPS is used exactly; with `prompt_mode: mask` the drawn outline itself.
- An ROI drawn on a few slices that are not neighbours (at most `multi_slice_max`, at least one
  empty slice between any two, typically the first, a middle and the last slice of the target) is
  ONE prompt on several slices: each slice's contour is honoured on its own slice.
- POINT ROIs (ContourGeometricType POINT) whose name ends with the positive marker ("GTV+") or the
  negative marker ("GTV-") are clicks for the structure named without the marker ("GTV"), on
  whatever slices they lie. Clicks for a structure that also has a drawn prompt are added to it
  (corrective clicks: positive where the result missed, negative where it leaked).
- Re-contour mode (`recontour_roi_regex`): a fully contoured ROI whose name matches the regex is
  re-propagated from its middle slice.
- Every other ROI (contoured on adjacent slices, or on more than `multi_slice_max`) is context and
  left alone, with a note.
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

    Its first part is in the top-level fields, further slices in `more` (same keys). A part of
    `kind` box has `box` = [x0, y0, x1, y1] inclusive voxel indices (x columns, y rows) on `slice`;
    point: `points` = [[x, y, positive], ...]; mask: the outline of ROI `sources[0]` on `slice`.
    `mode` says how it was found: "prompt" (drawn ROI / points) or "recontour".
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
    more: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PromptSpec":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def parts(self) -> list[dict[str, Any]]:
        """Every slice's part as {kind, slice, box | points | mask_voxels}, in slice order."""
        first = {k: v for k, v in (("kind", self.kind), ("slice", self.slice), ("box", self.box),
                                   ("points", self.points), ("mask_voxels", self.mask_voxels)) if v is not None}
        return sorted([first, *self.more], key=lambda p: (p["slice"], p["kind"] == "point"))

    @property
    def slices(self) -> list[int]:
        return sorted({p["slice"] for p in self.parts})

    def describe(self) -> str:
        """"box on slice 12", "box on slices 8, 12, 16 + clicks", for descriptions and logs."""
        kinds = sorted({p["kind"] for p in self.parts}, key=["box", "mask", "point"].index)
        names = {"box": "box", "mask": "outline", "point": "clicks"}
        where = f"slice {self.slices[0]}" if len(self.slices) == 1 else f"slices {', '.join(map(str, self.slices))}"
        return " + ".join(names[k] for k in kinds) + f" on {where}"

    def add(self, part: dict[str, Any]) -> None:
        self.more.append(part)


def _spec(structure: str, parts: list[dict[str, Any]], sources: list[str], mode: str = "prompt",
          notes: list[str] | None = None) -> PromptSpec:
    first, *more = parts
    return PromptSpec(structure, first["kind"], first["slice"], sources, mode, first.get("box"), first.get("points"),
                      first.get("mask_voxels"), list(notes or []), more)


def _strip_marker(name: str, cfg: PipelineConfig) -> tuple[str, bool] | None:
    """(structure, positive) for a point ROI name carrying a marker, else None (longer marker first)."""
    markers = sorted([(cfg.positive_point_marker, True), (cfg.negative_point_marker, False)],
                     key=lambda m: -len(m[0]))
    for marker, positive in markers:
        if marker and name.endswith(marker) and len(name) > len(marker):
            return name[: -len(marker)].strip(), positive
    return None


def _box_on_slice(roi, volume, z: int) -> list[int]:
    """Bounding rectangle of the ROI's contour points on slice z, as voxel indices, clipped to the image."""
    ny, nx = volume.array.shape[1:]
    pts = [volume.geometry.patient_to_index(c) for c, g in zip(roi.contours_mm, roi.geometric_types) if g != "POINT"]
    ijk = np.concatenate([p for p in pts if int(round(float(np.median(p[:, 2])))) == z] or pts)
    x0, x1 = (int(np.clip(round(float(v)), 0, nx - 1)) for v in (ijk[:, 0].min(), ijk[:, 0].max()))
    y0, y1 = (int(np.clip(round(float(v)), 0, ny - 1)) for v in (ijk[:, 1].min(), ijk[:, 1].max()))
    if x1 <= x0 or y1 <= y0:  # a degenerate outline: fall back on the rasterised extent
        rows, cols = np.flatnonzero(roi.mask[z].any(axis=1)), np.flatnonzero(roi.mask[z].any(axis=0))
        x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
    return [x0, y0, x1, y1]


def _drawn_part(roi, volume, z: int, prompt_mode: str) -> dict[str, Any]:
    """One slice of a drawn prompt: its box, or its outline (prompt_mode, `auto` = box if it is a rectangle)."""
    box = _box_on_slice(roi, volume, z)
    mode = prompt_mode
    if mode == "auto":
        area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
        mode = "box" if roi.mask[z].sum() >= RECTANGLE_FILL * area else "mask"
    if mode == "mask":
        return {"kind": "mask", "slice": z, "mask_voxels": int(roi.mask[z].sum())}
    return {"kind": "box", "slice": z, "box": box}


def prompt_slices_of(slices: np.ndarray, most: int) -> bool:
    """Do these contoured slices form a multi-slice prompt: 1, or 2..most slices none of them neighbours?"""
    return len(slices) == 1 or (2 <= len(slices) <= most and bool(np.all(np.diff(slices) >= 2)))


def find_prompts(structure_set, volume, pipeline: PipelineConfig) -> tuple[list[PromptSpec], list[str]]:
    """The prompts in `structure_set` (read on `volume`), and notes on every ROI not used and why."""
    notes: list[str] = []
    specs: dict[str, PromptSpec] = {}
    regex = re.compile(pipeline.recontour_roi_regex, re.IGNORECASE) if pipeline.recontour_roi_regex else None
    unmatched = {u.roi_number for u in structure_set.unmatched if u.geometric_type != "POINT"}
    clicks: dict[str, dict[str, Any]] = {}

    for roi in structure_set.rois:
        if roi.points and all(g == "POINT" for g in roi.geometric_types):
            parsed = _strip_marker(roi.name, pipeline)
            if parsed is None:
                notes.append(f"POINT ROI {roi.name!r}: no +/- marker ({pipeline.positive_point_marker!r}/"
                             f"{pipeline.negative_point_marker!r}): ignored")
                continue
            structure, positive = parsed
            group = clicks.setdefault(structure.lower(), {"structure": structure, "points": [], "sources": []})
            group["sources"].append(roi.name)
            group["points"] += [(*p.index_xyz, positive) for p in roi.points if p.index_xyz is not None]
            continue
        if roi.is_empty or roi.mask is None or not roi.mask.any():
            notes.append(f"ROI {roi.name!r}: no contour on this series: ignored")
            continue
        slices = np.flatnonzero(roi.mask.any(axis=(1, 2)))
        key = roi.name.strip().lower()
        if prompt_slices_of(slices, pipeline.multi_slice_max) and roi.number not in unmatched:
            if key in specs:
                notes.append(f"ROI {roi.name!r}: a second prompt for structure {roi.name!r}: ignored")
                continue
            specs[key] = _spec(roi.name.strip(), [_drawn_part(roi, volume, int(z), pipeline.prompt_mode)
                                                  for z in slices], [roi.name])
        elif regex is not None and regex.fullmatch(roi.name.strip()):
            if key in specs:
                notes.append(f"ROI {roi.name!r}: structure already prompted: ignored")
                continue
            prompt = prompt_from_roi(roi.mask, "box" if pipeline.prompt_mode == "box" else "mask")
            part: dict[str, Any] = {"kind": "box", "slice": prompt.slice_index}
            if isinstance(prompt, BoxPrompt):
                part["box"] = [prompt.x0, prompt.y0, prompt.x1, prompt.y1]
            else:
                part.update(kind="mask", mask_voxels=int(prompt.mask.sum()))
            specs[key] = _spec(roi.name.strip(), [part], [roi.name], mode="recontour")
        else:
            adjacent = len(slices) > 1 and np.any(np.diff(slices) < 2)
            why = "on neighbouring slices (a contour, not a prompt)" if adjacent else \
                f"on {len(slices)} slices, more than pipeline.multi_slice_max={pipeline.multi_slice_max}"
            notes.append(f"ROI {roi.name!r}: contoured {why}" + (" and not matching recontour_roi_regex" if regex
                                                                else "") + ": left alone")

    ny, nx, nz = volume.array.shape[1], volume.array.shape[2], volume.array.shape[0]
    for key, group in clicks.items():
        by_slice: dict[int, list[list[Any]]] = {}
        spec_notes = []
        for x, y, k, positive in group["points"]:
            z = int(round(float(k)))
            if not (0 <= z < nz and 0 <= round(x) < nx and 0 <= round(y) < ny):
                spec_notes.append(f"point ({x:.1f}, {y:.1f}) on slice {k:.1f} is outside the series: ignored")
                continue
            by_slice.setdefault(z, []).append([int(round(x)), int(round(y)), bool(positive)])
        parts = [{"kind": "point", "slice": z, "points": pts} for z, pts in sorted(by_slice.items())]
        if key in specs:
            for part in parts:
                specs[key].add(part)
            specs[key].sources += group["sources"]
            specs[key].notes += spec_notes
        elif not any(p[2] for part in parts for p in part["points"]):
            notes.append(f"points for {group['structure']!r} ({', '.join(group['sources'])}): no positive point: ignored")
        else:
            specs[key] = _spec(group["structure"], parts, group["sources"], notes=spec_notes)
    return list(specs.values()), notes


def prompt_objects(spec: PromptSpec, structure_set=None) -> list[Prompt]:
    """The `models.prompts` objects of `spec`, one per part; outlines are taken from `structure_set`."""
    out: list[Prompt] = []
    for part in spec.parts:
        z = int(part["slice"])
        if part["kind"] == "box":
            x0, y0, x1, y1 = part["box"]
            out.append(BoxPrompt(z, int(x0), int(y0), int(x1), int(y1)))
        elif part["kind"] == "point":
            out.append(PointPrompt(z, tuple((int(x), int(y), bool(s)) for x, y, s in part["points"])))
        elif part["kind"] == "mask":
            if structure_set is None:
                raise PromptError(f"mask prompt for {spec.structure!r} needs the RTSTRUCT it was drawn in")
            roi = structure_set.roi(spec.sources[0])
            out.append(MaskPrompt(z, np.asarray(roi.mask[z], dtype=bool).copy()))
        else:
            raise PromptError(f"unknown prompt kind {part['kind']!r}")
    return out
