"""JSON API for scripts (Bearer token from `rtprop users token`, or the session): jobs and review decisions.

States are the names of pipeline/jobs.py (`awaiting_review`, ...). Patient names never appear here.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from db.schema import Job, Send
from pipeline import actions
from pipeline.jobs import STATES
from web.routing import Ctx, route

JOB_FIELDS = ("id", "state", "kind", "calling_ae", "study_instance_uid", "series_instance_uid",
              "rtstruct_sop_instance_uid", "dry_run", "backend", "checkpoint_sha256", "timings_s", "file_check_dice",
              "result_sha256", "error", "attempts", "created_at", "updated_at")


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
        out["sends"] = [{"id": s.id, "state": s.state, "attempts": s.attempts, "destination": f"{s.destination_ae}@"
                         f"{s.destination_host}:{s.destination_port}", "last_status": s.last_status,
                         "last_error": s.last_error} for s in
                        session.execute(select(Send).where(Send.job_id == job_id).order_by(Send.id)).scalars()]
        out["reviews"] = [{"roi": r.roi, "decision": r.decision, "rating": r.rating, "comment": r.comment,
                           "user": r.user, "at": r.at.isoformat()} for r in actions.decisions(session, job_id).values()]
    return JSONResponse(out)


def post_review(ctx: Ctx) -> Response:
    job_id = int(ctx.request.path_params["job_id"])
    body = ctx.body if isinstance(ctx.body, dict) else None
    if body is None:
        return JSONResponse({"error": 'body must be JSON: {"roi": NAME|null, "decision": "accept"|"reject", '
                             '"rating": 1-5, "comment": "..."}'}, status_code=400)
    rating = body.get("rating")
    if rating is not None and not isinstance(rating, int):
        return JSONResponse({"error": "rating must be an integer 1-5"}, status_code=400)
    try:
        out = actions.review(ctx.state.factory, ctx.state.config, job_id, ctx.user.name, roi=body.get("roi"),
                             decision=str(body.get("decision", "")), rating=rating,
                             comment=str(body.get("comment") or ""))
    except actions.ActionError as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    return JSONResponse({"job_id": job_id, "state": out.state, "message": out.message, **out.details})


def routes() -> list[BaseRoute]:
    return [route("/api/v1/jobs", list_jobs), route("/api/v1/jobs/{job_id:int}", get_job),
            route("/api/v1/jobs/{job_id:int}/review", post_review, role="reviewer", methods=("POST",))]
