"""The review page: the series with the result's contours, corrections per structure, Accept / Reject.

The page (web/templates/review.html, web/static/review.js) loads `state.json`: the job's newest
revision (pipeline/revisions.py) with every ROI's contours as polygons from its RTSTRUCT, per-slice
confidence, the corrections in force and the history. Slice images and sagittal / coronal
reconstructions are PNGs windowed on the server. Corrections and undo go through the JSON API
(web/api.py), decisions through the form here or the API. Slice numbers start at 0, as in the
CLI, the audit and the batch. Each structure's calibrated confidence (models/confidence.py) is
read from the result's review.json, as the job list shows it.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import numpy as np
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute

from db.schema import Job
from pipeline import actions, revisions
from pipeline.discovery import rtstruct_path, series_folder
from pipeline.prompt_rois import PromptSpec
from web.overlay import (PLANES, SOURCE_COLOUR, WINDOWS, Overlay, SeriesImage, load_series, plane_shape,
                         render_plane, render_slice, rtstruct_overlays, window)
from web.routing import Ctx, audit_read, route

PRESETS = {"soft": "Soft tissue", "lung": "Lung", "bone": "Bone", "brain": "Brain"}
SLICE_READS_AUDITED_EVERY_S = 600.0  # slice images: one `web.read` row per user and job in this time, not per image



def structure_confidences(job: Job) -> list[tuple[str, float]]:
    """(structure, confidence) of each structure of the job's result, as review.json holds them."""
    return [(str(s.get("structure", "")), float(s["structure_confidence"]))
            for s in revisions.side_file(job).get("structures", []) if s.get("structure_confidence") is not None]


def series_image(ctx: Ctx, job: Job) -> SeriesImage:
    with ctx.state.factory() as session:
        folder = series_folder(session, job.series_instance_uid)
    return ctx.state.series_cache.get(job.series_instance_uid, lambda: load_series(folder, job.series_instance_uid))


def source_names(job: Job) -> set[str]:
    """The prompt RTSTRUCT's ROIs the job's prompts came from (drawn in cyan: the planner's prompt, or the
    clinician's contour a re-contour started from)."""
    return {s for p in (job.prompts or []) for s in p.get("sources", [])}


def overlays(ctx: Ctx, job: Job, image: SeriesImage, rtstruct: Path) -> list[Overlay]:
    """The ROIs of `rtstruct` (a revision of the job's result) and, in a second colour, the prompt's source ROIs."""
    def load() -> list[Overlay]:
        out = rtstruct_overlays(rtstruct, image.geometry)
        if source_names(job) and job.rtstruct_sop_instance_uid:
            out += rtstruct_overlays(_prompt_path(ctx, job), image.geometry, only=source_names(job), source=True)
        return out

    return ctx.state.overlay_cache.get((job.id, str(rtstruct)), load)


def _prompt_path(ctx: Ctx, job: Job) -> Path:
    with ctx.state.factory() as session:
        return rtstruct_path(session, job.rtstruct_sop_instance_uid)


def _job(ctx: Ctx) -> Job | None:
    with ctx.state.factory() as session:
        return session.get(Job, int(ctx.request.path_params["job_id"]))


def _reviewable(job: Job | None) -> bool:
    return job is not None and bool(job.result_path) and Path(job.result_path).is_file()


def review_page(ctx: Ctx) -> Response:
    job = _job(ctx)
    if not _reviewable(job):
        return PlainTextResponse("this job has no result to review", status_code=404)
    image = series_image(ctx, job)
    nz, ny, nx = image.array.shape
    with ctx.state.factory() as session:
        revision = revisions.current(session, job)
        done = actions.decisions(session, job.id)
    base = revisions.side_file(job).get("structures", [])
    drawn = overlays(ctx, job, image, revision.rtstruct)
    colours = {o.name: "#%02x%02x%02x" % o.colour for o in drawn if not o.source}
    rois = [{"name": s.name, "structure": s.structure, "colour": colours.get(s.name, "#ff8000"),
             "decision": done.get(s.name)} for s in revision.rois]
    prompt_slices = sorted({z for p in job.prompts or [] for z in PromptSpec.from_json(p).slices})
    asked = ctx.request.query_params.get("z", "")
    start = int(asked) if asked.isdigit() else (prompt_slices[0] if prompt_slices else nz // 2)
    header = image.header
    patient = {"name": str(header.get("PatientName", "")) if header is not None else "",
               "id": str(header.get("PatientID", "")) if header is not None else ""}
    sx, sy, sz = image.geometry.spacing_mm
    level, width = window(image, "soft" if image.modality.upper() == "CT" else "auto")
    presets = {name: list(WINDOWS[name]) for name in PRESETS} if image.modality.upper() == "CT" else {}
    presets["auto"] = [round(v, 1) for v in image.auto_window]
    can_review = ctx.user.can("reviewer") and job.state == "awaiting_review"
    audit_read(ctx, job, "review_page")
    return ctx.render("review.html", job=job, nz=nz, ny=ny, nx=nx, start=min(max(start, 0), nz - 1), rois=rois,
                      revision=revision, prompt_slices=prompt_slices, positions=image.positions_mm,
                      spacing=[round(sx, 4), round(sy, 4), round(sz, 4)], modality=image.modality, patient=patient,
                      level=round(level, 1), width=round(width, 1), presets=presets, preset_names=PRESETS,
                      threshold=ctx.state.config.review.uncertain_below, has_confidence=bool(base),
                      sources=sorted(source_names(job)), source_colour="#%02x%02x%02x" % SOURCE_COLOUR,
                      can_review=can_review, planes={p: plane_shape(image, p) for p in PLANES},
                      superior_last=image.superior_last)


def _polygons(overlay: Overlay) -> dict[str, list[list[list[float]]]]:
    return {str(z): [np.round(p, 2).tolist() for p in polys] for z, polys in sorted(overlay.polygons.items())}


def review_state(ctx: Ctx) -> Response:
    """The job's newest revision as the page draws it (see the module docstring)."""
    job = _job(ctx)
    if not _reviewable(job):
        return JSONResponse({"error": "this job has no result to review"}, status_code=404)
    image = series_image(ctx, job)
    with ctx.state.factory() as session:
        revision = revisions.current(session, job)
        done = actions.decisions(session, job.id)
        rows = revisions.history(session, job.id)
    drawn = overlays(ctx, job, image, revision.rtstruct)
    by_name = {o.name: o for o in drawn if not o.source}
    threshold = ctx.state.config.review.uncertain_below
    rois = []
    side = revisions.side_file(job).get("structures", [])
    for i, state in enumerate(revision.rois):
        # the calibrated confidence is the propagated result's: a structure a reviewer corrected has none
        calibrated = side[i].get("structure_confidence") if i < len(side) and not state.number else None
        confidence = revisions.roi_confidence(job, state, i, image.array.shape[0], ctx.state.revision_cache)
        overlay = by_name.get(state.name)
        contoured = sorted(int(z) for z in (overlay.polygons if overlay else {}))  # as the RTSTRUCT has it
        decision = done.get(state.name)
        rois.append({
            "name": state.name, "structure": state.structure,
            "colour": "#%02x%02x%02x" % (overlay.colour if overlay else (255, 128, 0)),
            "revision": state.number, "slices": [contoured[0], contoured[-1]] if contoured else None,
            "confidence": [round(float(c), 3) for c in confidence],
            "mean_confidence": round(float(np.mean(confidence[contoured])) if contoured else 0.0, 3),
            "structure_confidence": calibrated,
            "uncertain": [z for z in contoured if confidence[z] < threshold],
            "corrections": [revisions.describe(c) for c in state.corrections], "items": list(state.corrections),
            "can_undo": state.previous >= 0,
            "warnings": list(state.warnings), "contours": _polygons(overlay) if overlay else {},
            "decision": {"decision": decision.decision, "user": decision.user, "rating": decision.rating,
                         "comment": decision.comment} if decision else None})
    return JSONResponse({
        "job": job.id, "state": job.state, "revision": revision.number, "by": revision.user,
        "at": revision.at.isoformat() if revision.at else None, "corrections": revision.corrections,
        "rois": rois,
        "sources": [{"name": o.name, "contours": _polygons(o)} for o in drawn if o.source],
        "history": [{"revision": r.number, "roi": r.roi, "action": r.action, "user": r.user,
                     "at": r.at.isoformat(timespec="seconds"),
                     "what": (r.summary or {}).get("description", r.action)} for r in rows]},
        headers={"Cache-Control": "no-store"})


def _window_params(ctx: Ctx, image: SeriesImage) -> tuple[float, float]:
    q = ctx.request.query_params
    try:
        level = float(q["level"]) if "level" in q else None
        width = float(q["width"]) if "width" in q else None
    except ValueError:
        level = width = None
    return window(image, q.get("window", "soft"), level, width)


def slice_png(ctx: Ctx) -> Response:
    job = _job(ctx)
    if job is None or not job.result_path:
        return PlainTextResponse("no result", status_code=404)
    image = series_image(ctx, job)
    z = int(ctx.request.path_params["z"])
    if not 0 <= z < image.array.shape[0]:
        return PlainTextResponse(f"slice {z} is outside 0..{image.array.shape[0] - 1}", status_code=404)
    png = render_slice(image, z, *_window_params(ctx, image))
    audit_read(ctx, job, "slice_images", every_s=SLICE_READS_AUDITED_EVERY_S)
    return Response(png, media_type="image/png")  # Cache-Control: no-store (web/security.py): no disk copy


def plane_png(ctx: Ctx) -> Response:
    """A sagittal or coronal reconstruction through the cursor, with every ROI of the newest revision outlined."""
    job = _job(ctx)
    plane = ctx.request.path_params["plane"]
    if not _reviewable(job) or plane not in PLANES:
        return PlainTextResponse("no such reconstruction", status_code=404)
    image = series_image(ctx, job)
    index = int(ctx.request.path_params["index"])
    axis = PLANES[plane]
    if not 0 <= index < image.array.shape[axis]:
        return PlainTextResponse(f"{plane} plane {index} is outside 0..{image.array.shape[axis] - 1}", status_code=404)
    with ctx.state.factory() as session:
        revision = revisions.current(session, job)
    drawn = {o.name: o.colour for o in overlays(ctx, job, image, revision.rtstruct)}
    outlines = [(SOURCE_COLOUR, m.plane(axis, index)) for m in _source_masks(ctx, job, image)]
    for i, state in enumerate(revision.rois):
        mask = revisions.roi_mask(job, state, i, image.volume, ctx.state.revision_cache)
        outlines.append((drawn.get(state.name, (255, 128, 0)), mask.plane(axis, index)))
    png = render_plane(image, plane, index, *_window_params(ctx, image), outlines)
    audit_read(ctx, job, "slice_images", every_s=SLICE_READS_AUDITED_EVERY_S)
    return Response(png, media_type="image/png")  # Cache-Control: no-store (web/security.py)


def _source_masks(ctx: Ctx, job: Job, image: SeriesImage) -> list[revisions.RoiMask]:
    names = source_names(job)
    if not names or not job.rtstruct_sop_instance_uid:
        return []

    def load() -> list[revisions.RoiMask]:
        from converters.rtstruct_read import read_rtstruct

        rois = read_rtstruct(_prompt_path(ctx, job), image.volume).rois
        return [revisions.RoiMask.of(r.mask, np.zeros(image.array.shape[0])) for r in rois
                if r.name in names and r.mask is not None]

    return ctx.state.revision_cache.get(("sources", job.id), load)


def review_submit(ctx: Ctx) -> Response:
    job_id = int(ctx.request.path_params["job_id"])
    f = ctx.form
    rating = int(f["rating"]) if f.get("rating", "").isdigit() else None
    shown = int(f["revision"]) if f.get("revision", "").isdigit() else None
    try:
        out = actions.review(ctx.state.factory, ctx.state.config, job_id, ctx.user.name, roi=f.get("roi") or None,
                             decision=f.get("decision", ""), rating=rating, comment=f.get("comment", ""),
                             revision=shown)
        message = out.message
    except (actions.ActionError, revisions.RevisionError) as exc:
        message = f"refused: {exc}"
    return RedirectResponse(f"/jobs/{job_id}/review?msg={quote(message)}", status_code=303)


def routes() -> list[BaseRoute]:
    return [route("/jobs/{job_id:int}/review", review_page),
            route("/jobs/{job_id:int}/review/state.json", review_state),
            route("/jobs/{job_id:int}/slices/{z:int}.png", slice_png),
            route("/jobs/{job_id:int}/planes/{plane}/{index:int}.png", plane_png),
            route("/jobs/{job_id:int}/review", review_submit, role="reviewer", methods=("POST",),
                  name="review_submit")]

