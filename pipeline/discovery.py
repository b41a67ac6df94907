"""Prompt discovery: which ROIs of an incoming RTSTRUCT are prompts, and which jobs the DB calls for.

Conventions (docs/pipeline.md; configurable in `pipeline:`):
- An ROI whose contours all lie on ONE slice is a prompt for a structure of the same name. With
  `prompt_mode: box` (default) the prompt is the rectangle bounding its contour points, so a
  rectangle drawn in the TPS is used exactly; with `prompt_mode: mask` the drawn outline itself.
- POINT ROIs (ContourGeometricType POINT) whose name ends with the positive marker ("GTV+") or the
  negative marker ("GTV-") are clicks for the structure named without the marker ("GTV"). Points
  must share one slice (the positive points' slice; others are ignored and noted).
- Re-contour mode (`recontour_roi_regex`): a fully contoured ROI whose name matches the regex is
  re-propagated from its middle slice.
- One structure gets one prompt; a box/outline beats points for the same name (noted).
- Every other ROI is context and left alone. RTSTRUCTs we wrote ourselves are never prompts
  (no feedback loop when a PACS sends our results back).

Jobs are created from DB state only (`discover`): an RTSTRUCT instance whose own series is
complete gets exactly one job (state `received`); once the image series it references (by
SeriesInstanceUID, else by FrameOfReferenceUID within the study) is complete, its prompts are
found and the job is `queued`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config, PipelineConfig, RTStructConfig
from db.engine import transaction
from db.schema import Instance, Job, Series, aware, utcnow
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, Prompt, PromptError
from pipeline.jobs import JobStateError, create_job, transition

LOG = logging.getLogger("rtprop.pipeline.discovery")

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
OWN_MANUFACTURER = "rtprop"
RECTANGLE_FILL = 0.95  # prompt_mode auto: an outline filling this much of its bounding rectangle is a box


class DiscoveryError(ValueError):
    """An RTSTRUCT that cannot become a job (no prompt, no usable series); the message says why."""


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
            from pipeline.prompts import prompt_from_roi

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


# --------------------------------------------------------------------------- TPS profiles
@dataclass(frozen=True)
class TpsProfile:
    """How results are named and typed for one planning system (documented in docs/pipeline.md)."""

    name: str
    max_name_len: int = 16
    allowed_name_chars: str | None = None  # regex character class of allowed characters, None = any printable
    type_from_name: bool = True  # RTROIInterpretedType from the name's prefix (GTV*, CTV*, PTV*, else default)
    colors_by_type: bool = True


PROFILES: dict[str, TpsProfile] = {
    # Eclipse: structure IDs of at most 16 characters; plain characters only.
    "eclipse": TpsProfile("eclipse", 16, r"A-Za-z0-9 _\-+.()~"),
    # RayStation appends "(1)" when a same-named ROI of another type arrives: our names carry the suffix,
    # and the type follows the name, so a re-sent result never collides with the planner's own ROI.
    "raystation": TpsProfile("raystation", 16, None),
    "monaco": TpsProfile("monaco", 16, r"A-Za-z0-9 _\-+.()~"),
    "generic": TpsProfile("generic", 16, None, type_from_name=False, colors_by_type=False),
}
TYPE_COLORS = {"GTV": (255, 0, 0), "CTV": (255, 165, 0), "PTV": (0, 128, 255), "ORGAN": (0, 200, 0),
               "OAR": (0, 200, 0), "EXTERNAL": (0, 255, 0)}
_TYPE_PREFIX = re.compile(r"^(GTV|CTV|ITV|PTV)", re.IGNORECASE)


def output_style(structure: str, settings: RTStructConfig) -> dict[str, Any]:
    """Name (before the writer's suffix), colour and RTROIInterpretedType of a result ROI."""
    profile = PROFILES[settings.tps_profile]
    name = structure.strip()
    if profile.allowed_name_chars:
        name = re.sub(f"[^{profile.allowed_name_chars}]", "_", name)
    itype = settings.roi_interpreted_type.upper()
    if profile.type_from_name:
        m = _TYPE_PREFIX.match(name)
        if m:
            itype = {"ITV": "CTV"}.get(m.group(1).upper(), m.group(1).upper())
    color = tuple(settings.roi_color)
    if profile.colors_by_type and itype in TYPE_COLORS:
        color = TYPE_COLORS[itype]
    return {"name": name, "color": color, "interpreted_type": itype}


# --------------------------------------------------------------------------- DB discovery
def _header(path: str) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def is_dry_run(config: Config, calling_ae: str) -> bool:
    """Shadow mode: the calling AE is listed in pipeline.dry_run_aes or its route says dry_run."""
    if calling_ae in config.pipeline.dry_run_aes:
        return True
    from dicom_node.routing import RoutingError, resolve_destination

    try:
        return resolve_destination(config, calling_ae).dry_run
    except RoutingError:
        return False


def create_jobs(factory: sessionmaker[Session], config: Config) -> list[int]:
    """One `received` job per RTSTRUCT instance of a complete series that has none yet."""
    with factory() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.study_instance_uid, Instance.calling_ae)
            .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
            .where(Instance.sop_class_uid == RTSTRUCT_CLASS, Series.state == "complete",
                   Instance.sop_instance_uid.not_in(select(Job.rtstruct_sop_instance_uid).where(Job.kind == "prompt")))
            .order_by(Instance.id)).all()
    created = []
    for sop_uid, study_uid, calling_ae in rows:
        with transaction(factory) as session:
            job, new = create_job(session, rtstruct_uid=sop_uid, study_uid=study_uid, calling_ae=calling_ae or "",
                                  dry_run=is_dry_run(config, calling_ae or ""))
            if new:
                created.append(job.id)
    return created


@dataclass
class SeriesMatch:
    series: Series | None
    reason: str = ""


def match_series(session: Session, rtstruct: pydicom.Dataset, study_uid: str, *,
                 arrived_at: datetime | None = None) -> SeriesMatch:
    """The image series an RTSTRUCT is drawn on: its referenced SeriesInstanceUID, else the one series of
    the study in its FrameOfReferenceUID. `series` None = not (yet) there, with the reason.

    Several series in that Frame of Reference and none referenced (e.g. a CT and a registered MR,
    RTSTRUCT referencing the original uncropped series) is ambiguous: refused, unless `arrived_at`
    (when the RTSTRUCT was received) is given, then the series whose last instance arrived closest
    to it is taken (the one it was sent with). Only the batch uses that; prompt jobs refuse."""
    referenced = [str(se.get("SeriesInstanceUID", ""))
                  for f in rtstruct.get("ReferencedFrameOfReferenceSequence", [])
                  for st in f.get("RTReferencedStudySequence", [])
                  for se in st.get("RTReferencedSeriesSequence", [])]
    frames = {str(f.get("FrameOfReferenceUID", "")) for f in rtstruct.get("ReferencedFrameOfReferenceSequence", [])}
    frames |= {str(r.get("ReferencedFrameOfReferenceUID", "")) for r in rtstruct.get("StructureSetROISequence", [])}
    frames.discard("")
    for uid in referenced:
        s = session.execute(select(Series).where(Series.series_instance_uid == uid)).scalar()
        if s is not None and s.modality != "RTSTRUCT":
            return SeriesMatch(s)
    candidates = session.execute(select(Series).where(Series.study_instance_uid == study_uid,
                                                      Series.modality != "RTSTRUCT")).scalars().all()
    same_frame = []
    for s in candidates:
        path = session.execute(select(Instance.path).where(Instance.series_instance_uid == s.series_instance_uid)
                               .limit(1)).scalar()
        try:
            if path and str(_header(path).get("FrameOfReferenceUID", "")) in frames:
                same_frame.append(s)
        except Exception as exc:  # noqa: BLE001 - an unreadable archived file is not this series
            LOG.warning("cannot read %s: %s", path, exc)
    if len(same_frame) == 1:
        return SeriesMatch(same_frame[0])
    if len(same_frame) > 1 and arrived_at is not None:
        gaps = sorted((abs((aware(s.last_received_at) - aware(arrived_at)).total_seconds()), s.series_instance_uid, s)
                      for s in same_frame)
        if gaps[0][0] < gaps[1][0]:
            return SeriesMatch(gaps[0][2], f"chosen by arrival time among {len(same_frame)} series in the frame")
    if len(same_frame) > 1:
        return SeriesMatch(None, f"ambiguous: {len(same_frame)} series in FrameOfReferenceUID {sorted(frames)} and "
                                 f"none referenced by SeriesInstanceUID ({[s.series_instance_uid for s in same_frame]})")
    return SeriesMatch(None, f"no image series {referenced or ''} in FrameOfReferenceUID {sorted(frames)} received")


def series_folder(session: Session, series_uid: str) -> Path:
    """The archive folder of a series (all its instances live in one folder)."""
    paths = session.execute(select(Instance.path).where(Instance.series_instance_uid == series_uid)).scalars().all()
    folders = {str(Path(p).parent) for p in paths}
    if len(folders) != 1:
        raise DiscoveryError(f"series {series_uid}: instances in {len(folders)} folders {sorted(folders)[:3]}")
    return Path(folders.pop())


def rtstruct_path(session: Session, sop_uid: str) -> Path:
    path = session.execute(select(Instance.path).where(Instance.sop_instance_uid == sop_uid)).scalar()
    if path is None:
        raise DiscoveryError(f"RTSTRUCT {sop_uid} is not in the instances table")
    return Path(path)


def resolve_received(factory: sessionmaker[Session], config: Config, now: datetime | None = None) -> dict[int, str]:
    """Move `received` jobs on: queued (prompts found), failed (why), or leave them waiting for the series."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    now = now or utcnow()
    changed: dict[int, str] = {}
    with factory() as session:
        ids = session.execute(select(Job.id).where(Job.state == "received", Job.kind == "prompt")
                              .order_by(Job.id)).scalars().all()
    for job_id in ids:
        with factory() as session:
            job = session.get(Job, job_id)
            try:
                path = rtstruct_path(session, job.rtstruct_sop_instance_uid)
                ds = _header(str(path))
            except Exception as exc:  # noqa: BLE001
                changed[job_id] = _fail(factory, job_id, f"prompt RTSTRUCT unreadable: {exc}")
                continue
            if str(ds.get("Manufacturer", "")).strip().lower() == OWN_MANUFACTURER:
                changed[job_id] = _fail(factory, job_id, "RTSTRUCT written by rtprop itself: never a prompt "
                                        "(a result sent back to the node)", event="job.ignored")
                continue
            match = match_series(session, ds, job.study_instance_uid)
            waited = (now - (aware(job.created_at) or now)).total_seconds()
            if match.series is None:
                if waited > config.pipeline.series_wait_s:
                    changed[job_id] = _fail(factory, job_id, f"no image series after {waited:.0f} s: {match.reason}")
                continue
            if match.series.state == "receiving":
                if waited > config.pipeline.series_wait_s + config.node.series_gap_timeout_s:
                    changed[job_id] = _fail(factory, job_id, f"image series {match.series.series_instance_uid} "
                                            f"still receiving after {waited:.0f} s")
                continue
            if match.series.state != "complete":
                changed[job_id] = _fail(factory, job_id, f"image series {match.series.series_instance_uid} is "
                                        f"{match.series.state}: {match.series.reason}")
                continue
            series_uid = match.series.series_instance_uid
            try:
                folder = series_folder(session, series_uid)
            except DiscoveryError as exc:
                changed[job_id] = _fail(factory, job_id, str(exc))
                continue
        try:
            volume = read_series(folder, series_uid)
            structure_set = read_rtstruct(path, volume)
            specs, notes = find_prompts(structure_set, volume, config.pipeline)
        except Exception as exc:  # noqa: BLE001 - any reason the inputs are unusable ends this job, with it
            changed[job_id] = _fail(factory, job_id, f"{type(exc).__name__}: {exc}", series_uid=series_uid)
            continue
        if not specs:
            changed[job_id] = _fail(factory, job_id, "no prompt ROI found (single-slice ROI, POINT ROI named with "
                                    f"{config.pipeline.positive_point_marker!r}/{config.pipeline.negative_point_marker!r}"
                                    ", or recontour_roi_regex match): " + "; ".join(notes)[:1500],
                                    series_uid=series_uid, event="job.no_prompt")
            continue
        with transaction(factory) as session:
            job = session.get(Job, job_id)
            try:
                transition(session, job, "queued", series_instance_uid=series_uid,
                           prompts=[s.to_json() for s in specs])
                from pipeline.jobs import audit_job

                audit_job(session, job, "job.prompts", prompts=[{"structure": s.structure, "kind": s.kind,
                                                                 "slice": s.slice, "mode": s.mode} for s in specs],
                          notes=notes[:20])
                changed[job_id] = "queued"
            except JobStateError as exc:  # another process moved it first
                LOG.info("%s", exc)
    return changed


def _fail(factory: sessionmaker[Session], job_id: int, reason: str, *, event: str = "job.failed",
          series_uid: str | None = None) -> str:
    with transaction(factory) as session:
        job = session.get(Job, job_id)
        fields: dict[str, Any] = {"error": reason}
        if series_uid:
            fields["series_instance_uid"] = series_uid
        try:
            transition(session, job, "failed", event=event, **fields)
        except JobStateError as exc:
            LOG.info("%s", exc)
            return job.state
    LOG.warning("job %s failed: %s", job_id, reason)
    return "failed"


def discover(factory: sessionmaker[Session], config: Config) -> dict[str, Any]:
    """One pass: create jobs for new prompt RTSTRUCTs, then move received jobs on."""
    created = create_jobs(factory, config)
    changed = resolve_received(factory, config)
    return {"created": created, "changed": changed}


def prompts_summary(prompts: list[dict[str, Any]] | None) -> str:
    return json.dumps([{k: p.get(k) for k in ("structure", "kind", "slice")} for p in prompts or []])
