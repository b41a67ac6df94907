"""The review page: the series with the propagated contour drawn over it, and Accept / Reject per structure.

Per-slice confidence comes from the job's result side-file `review.json` (written by
pipeline/compute.py beside the RTSTRUCT: per structure its output ROI name, prompt
slice, warnings, its structure confidence and one confidence value per slice); a job without it
shows no confidence.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute

from db.schema import Job
from pipeline import actions
from pipeline.discovery import rtstruct_path, series_folder
from pipeline.prompt_rois import PromptSpec
from web.routing import Ctx, route
from web.overlay import WINDOWS, Overlay, SeriesImage, load_series, render_slice, rtstruct_overlays


def side_file(job: Job) -> dict[str, Any]:
    """The job's review.json (see the module docstring), or {} when it has none."""
    if not job.result_path:
        return {}
    path = Path(job.result_path).parent / "review.json"
    try:
        return _read_side_file(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError):
        return {}


@lru_cache(maxsize=1024)
def _read_side_file(path: str, mtime_ns: int) -> dict[str, Any]:
    """review.json parsed once per version (the job list re-reads every job's every few seconds)."""
    return json.loads(Path(path).read_text())


def structure_confidences(job: Job) -> list[tuple[str, float]]:
    """(structure, confidence) of each structure of the job's result, as review.json holds them."""
    return [(str(s.get("structure", "")), float(s["structure_confidence"]))
            for s in side_file(job).get("structures", []) if s.get("structure_confidence") is not None]


def series_image(ctx: Ctx, job: Job) -> SeriesImage:
    with ctx.state.factory() as session:
        folder = series_folder(session, job.series_instance_uid)
    return ctx.state.series_cache.get(job.series_instance_uid, lambda: load_series(folder, job.series_instance_uid))


def overlays(ctx: Ctx, job: Job, image: SeriesImage) -> list[Overlay]:
    """The result's ROIs and, in a second colour, the ROIs of the prompt RTSTRUCT they came from."""
    def load() -> list[Overlay]:
        out = rtstruct_overlays(Path(job.result_path), image.geometry)
        sources = {s for p in (job.prompts or []) for s in p.get("sources", [])}
        if sources and job.rtstruct_sop_instance_uid:
            with ctx.state.factory() as session:
                prompt = rtstruct_path(session, job.rtstruct_sop_instance_uid)
            out += rtstruct_overlays(prompt, image.geometry, only=sources, source=True)
        return out

    return ctx.state.overlay_cache.get((job.id, job.result_path), load)


def _job(ctx: Ctx) -> Job | None:
    with ctx.state.factory() as session:
        return session.get(Job, int(ctx.request.path_params["job_id"]))


def review_page(ctx: Ctx) -> Response:
    job = _job(ctx)
    if job is None or not job.result_path or not Path(job.result_path).is_file():
        return PlainTextResponse("this job has no result to review", status_code=404)
    image = series_image(ctx, job)
    drawn = overlays(ctx, job, image)
    nz = image.array.shape[0]
    side = side_file(job)
    structures = side.get("structures", [])
    by_roi = {s.get("roi"): s for s in structures}
    confidence = [0.0] * nz
    for s in structures:
        for z, c in enumerate(s.get("confidence", [])[:nz]):
            confidence[z] = max(confidence[z], float(c))
    contour_slices = sorted({z for o in drawn if not o.source for z in o.polygons})
    prompt_slices = sorted({z for p in job.prompts or [] for z in PromptSpec.from_json(p).slices})
    threshold = ctx.state.config.review.uncertain_below
    uncertain = [z for z in contour_slices if structures and confidence[z] < threshold]
    with ctx.state.factory() as session:
        done = actions.decisions(session, job.id)
    rois = [{"name": o.name, "colour": "#%02x%02x%02x" % o.colour, "slices": sorted(o.polygons),
             "decision": done.get(o.name), "structure": by_roi.get(o.name, {}).get("structure", ""),
             "warnings": by_roi.get(o.name, {}).get("warnings", [])} for o in drawn if not o.source]
    header = image.header
    patient = {"name": str(header.get("PatientName", "")) if header is not None else "",
               "id": str(header.get("PatientID", "")) if header is not None else ""}
    asked = ctx.request.query_params.get("z", "")
    start = int(asked) if asked.isdigit() else (contour_slices[0] if contour_slices else nz // 2)
    return ctx.render("review.html", job=job, nz=nz, start=min(max(start, 0), nz - 1), rois=rois,
                      sources=sorted({o.name for o in drawn if o.source}), confidence=confidence,
                      contour_slices=contour_slices, prompt_slices=prompt_slices, uncertain=uncertain,
                      positions=image.positions_mm, windows=list(WINDOWS), modality=image.modality,
                      default_window="soft" if image.modality.upper() == "CT" else "auto", patient=patient,
                      threshold=threshold, scale=image.scale, width=image.array.shape[2] * image.scale,
                      height=image.array.shape[1] * image.scale, has_confidence=bool(structures),
                      can_review=ctx.user.can("reviewer") and job.state == "awaiting_review")


def slice_png(ctx: Ctx) -> Response:
    job = _job(ctx)
    if job is None or not job.result_path:
        return PlainTextResponse("no result", status_code=404)
    image = series_image(ctx, job)
    z = int(ctx.request.path_params["z"])
    if not 0 <= z < image.array.shape[0]:
        return PlainTextResponse(f"slice {z} is outside 0..{image.array.shape[0] - 1}", status_code=404)
    png = render_slice(image, z, ctx.request.query_params.get("window", "soft"), overlays(ctx, job, image))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def review_submit(ctx: Ctx) -> Response:
    job_id = int(ctx.request.path_params["job_id"])
    f = ctx.form
    rating = int(f["rating"]) if f.get("rating", "").isdigit() else None
    try:
        out = actions.review(ctx.state.factory, ctx.state.config, job_id, ctx.user.name, roi=f.get("roi") or None,
                             decision=f.get("decision", ""), rating=rating, comment=f.get("comment", ""))
        message = out.message
    except actions.ActionError as exc:
        message = f"refused: {exc}"
    return RedirectResponse(f"/jobs/{job_id}/review?msg={quote(message)}", status_code=303)


def routes() -> list[BaseRoute]:
    return [route("/jobs/{job_id:int}/review", review_page),
            route("/jobs/{job_id:int}/slices/{z:int}.png", slice_png),
            route("/jobs/{job_id:int}/review", review_submit, role="reviewer", methods=("POST",),
                  name="review_submit")]
