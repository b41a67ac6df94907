"""JSON API for scripts (Bearer token from `rtprop users token`, or the session): jobs, a reviewer's
corrections (pipeline/revisions.py) and review decisions.

States are the names of pipeline/jobs.py (`awaiting_review`, ...). Patient names never appear here.
Coordinates are voxel indices as in `rtprop propagate`: `slice` is z (from 0), `x` the column, `y` the
row. Every correction, undo, download and decision is audited with the user, refusals included.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute

from db.engine import transaction
from db.schema import Job, Send
from pipeline import actions, revisions
from pipeline import jobs as J
from pipeline.delivery import destination_text
from pipeline.jobs import STATES
from web.review import series_image
from web.routing import Ctx, audit_read, route

LOG = logging.getLogger("rtprop.web.api")
JOB_FIELDS = ("id", "state", "kind", "calling_ae", "study_instance_uid", "series_instance_uid",
              "rtstruct_sop_instance_uid", "result_sop_instance_uid", "dry_run", "backend", "checkpoint_sha256",
              "timings_s", "file_check_dice", "result_sha256", "error", "attempts", "created_at", "updated_at")


def job_json(job: Job) -> dict[str, Any]:
    out = {f: getattr(job, f) for f in JOB_FIELDS}
    out["created_at"], out["updated_at"] = job.created_at.isoformat(), job.updated_at.isoformat()
    out["structures"] = [p.get("structure") for p in (job.prompts or [])]
    return out


def list_jobs(ctx: Ctx) -> Response:
    state = ctx.request.query_params.get("state")
    if state and state not in STATES:
        return JSONResponse({"error": f"state {state!r}: expected one of {', '.join(STATES)}"}, status_code=400)
    asked = ctx.request.query_params.get("limit", "")
    limit = min(int(asked), 1000) if asked.isdigit() else 200
    stmt = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        stmt = stmt.where(Job.state == state)
    with ctx.state.factory() as session:
        return JSONResponse({"jobs": [job_json(j) for j in session.execute(stmt).scalars()]})


def get_job(ctx: Ctx) -> Response:
    job_id = int(ctx.request.path_params["job_id"])
    with ctx.state.factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        out = job_json(job)
        out["prompts"] = job.prompts or []
        out["route"], out["destination"] = job.route, destination_text(ctx.state.config, job)
        out["sends"] = [{"id": s.id, "state": s.state, "attempts": s.attempts, "destination": f"{s.destination_ae}@"
                         f"{s.destination_host}:{s.destination_port}", "last_status": s.last_status,
                         "last_error": s.last_error} for s in
                        session.execute(select(Send).where(Send.job_id == job_id).order_by(Send.id)).scalars()]
        out["reviews"] = [{"roi": r.roi, "decision": r.decision, "rating": r.rating, "comment": r.comment,
                           "user": r.user, "at": r.at.isoformat()} for r in actions.decisions(session, job_id).values()]
    audit_read(ctx, job, "api_job")
    return JSONResponse(out)


def _revision(body: dict[str, Any]) -> int | None:
    """The revision the caller looked at ("revision", optional): a compare-and-set against newer ones."""
    value = body.get("revision")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise revisions.CorrectionError(f"revision must be the revision number you looked at (an integer >= 0), "
                                        f"got {value!r}")
    return value


def _refused(ctx: Ctx, job_id: int, event: str, exc: Exception, status: int, **details: Any) -> Response:
    revisions.audit_refused(ctx.state.factory, job_id, ctx.user.name, event, str(exc), status=status, **details)
    out: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, revisions.RevisionConflict):
        out["revision"] = exc.current
    return JSONResponse(out, status_code=status)


def _made(made: revisions.Made) -> Response:
    timing = ", ".join(f"{k.removesuffix('_s')};dur={1000 * v:.1f}" for k, v in made.timings_s.items())
    return JSONResponse({"revision": made.revision, "roi": made.roi,
                         "slices": list(made.slices) if made.slices else None, "confidence": made.confidence},
                        status_code=201, headers={"Server-Timing": timing})


def _change(ctx: Ctx, event: str, usage: str, act) -> Response:  # type: ignore[no-untyped-def]
    """A correction or an undo: the body checked, the work done by `act(job, image, roi, based_on)`, the
    refusals answered (400 a bad request, 404 no job, 409 the job, ROI or revision moved on) and audited."""
    job_id = int(ctx.request.path_params["job_id"])
    body = ctx.body if isinstance(ctx.body, dict) else None
    roi = body.get("roi") if body else None
    try:
        if body is None:
            raise revisions.CorrectionError(f"body must be a JSON object: {usage}")
        if not isinstance(roi, str) or not roi:
            raise revisions.CorrectionError(f"roi is missing: the name of an ROI of the result ({usage})")
        based_on = _revision(body)
        with ctx.state.factory() as session:
            job = session.get(Job, job_id)
        if job is None or not job.result_path:
            return _refused(ctx, job_id, event + "_refused", LookupError(f"no job {job_id} with a result"), 404)
        made = act(job, series_image(ctx, job), roi, based_on, body)
    except revisions.CorrectionError as exc:
        return _refused(ctx, job_id, event + "_refused", exc, 400, roi=roi)
    except (revisions.RevisionError, actions.ActionError) as exc:
        return _refused(ctx, job_id, event + "_refused", exc, 409, roi=roi)
    except Exception as exc:  # noqa: BLE001 - ours (or the model's files): said, audited, logged, nothing recorded
        LOG.exception("job %s: %s failed", job_id, event)
        return _refused(ctx, job_id, event + "_failed", RuntimeError(f"{type(exc).__name__}: {exc}; nothing "
                                                                     "recorded"), 500, roi=roi)
    return _made(made)


def post_correction(ctx: Ctx) -> Response:
    s = ctx.state
    return _change(ctx, "job.correction", '{"roi": NAME, "kind": "point"|"box"|"outline"|"extent", ...}',
                   lambda job, image, roi, based_on, body: revisions.add_correction(
                       s.factory, s.config, job.id, ctx.user.name, roi, body, volume=image.volume,
                       based_on=based_on, memo=s.revision_cache))


def post_undo(ctx: Ctx) -> Response:
    s = ctx.state
    return _change(ctx, "job.undo", '{"roi": NAME}',
                   lambda job, image, roi, based_on, body: revisions.undo(
                       s.factory, s.config, job.id, ctx.user.name, roi, volume=image.volume, based_on=based_on,
                       memo=s.revision_cache))


def get_result(ctx: Ctx) -> Response:
    """The RTSTRUCT of the job's newest revision (what an accept sends), as application/dicom."""
    job_id = int(ctx.request.path_params["job_id"])
    with ctx.state.factory() as session:
        job = session.get(Job, job_id)
        if job is None or not job.result_path or not Path(job.result_path).is_file():
            return JSONResponse({"error": f"no job {job_id} with a result"}, status_code=404)
        revision = revisions.current(session, job)
    with transaction(ctx.state.factory) as session:
        J.audit_job(session, session.get(Job, job_id), "job.result_read", user=ctx.user.name,
                    revision=revision.number, rtstruct=revision.rtstruct.name)
    return FileResponse(revision.rtstruct, media_type="application/dicom", filename=revision.rtstruct.name,
                        headers={"X-Rtprop-Revision": str(revision.number)})


def post_review(ctx: Ctx) -> Response:
    job_id = int(ctx.request.path_params["job_id"])
    body = ctx.body if isinstance(ctx.body, dict) else None
    if body is None:
        return JSONResponse({"error": 'body must be JSON: {"roi": NAME|null, "decision": "accept"|"reject", '
                             '"rating": 1-5, "comment": "...", "revision": N}'}, status_code=400)
    rating = body.get("rating")
    if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int)):  # True is an int in Python
        return JSONResponse({"error": "rating must be an integer 1-5"}, status_code=400)
    for key in ("roi", "decision", "comment"):
        if body.get(key) is not None and not isinstance(body[key], str):
            return JSONResponse({"error": f"{key} must be a string"}, status_code=400)
    try:
        out = actions.review(ctx.state.factory, ctx.state.config, job_id, ctx.user.name, roi=body.get("roi"),
                             decision=str(body.get("decision", "")), rating=rating,
                             comment=str(body.get("comment") or ""), revision=_revision(body))
    except revisions.CorrectionError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    except (actions.ActionError, revisions.RevisionError) as exc:
        return _refused(ctx, job_id, "job.review_refused", exc, 409, roi=body.get("roi"))
    return JSONResponse({"job_id": job_id, "state": out.state, "message": out.message, **out.details})


def routes() -> list[BaseRoute]:
    return [route("/api/v1/jobs", list_jobs), route("/api/v1/jobs/{job_id:int}", get_job),
            route("/api/v1/jobs/{job_id:int}/result", get_result, role="reviewer"),
            route("/api/v1/jobs/{job_id:int}/corrections", post_correction, role="reviewer", methods=("POST",)),
            route("/api/v1/jobs/{job_id:int}/corrections/undo", post_undo, role="reviewer", methods=("POST",)),
            route("/api/v1/jobs/{job_id:int}/review", post_review, role="reviewer", methods=("POST",))]
