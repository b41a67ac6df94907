"""Operations pages: dashboard, jobs (list, detail, admin actions), quarantine, batch reports, audit, login locks."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import func, or_, select
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute

from db import audit as audit_log
from db.engine import transaction
from db.heartbeat import latest
from db.receipts import verify_all
from db.schema import AuditEntry, Job, Send, aware, utcnow
from pipeline import actions
from pipeline.delivery import destination_text
from pipeline.jobs import STATES
from web.routing import Ctx, client_address, route

TIMELINE = ("job.created", "series.complete", "job.queued", "job.claimed", "job.propagated", "job.validated",
            "job.awaiting_review", "job.review", "job.accepted", "job.rejected", "job.sending", "send.queued",
            "send.attempt", "send.sent", "send.failed", "send.dead_letter", "job.sent", "job.failed",
            "job.quarantined", "job.dead_letter", "job.recovered", "job.timeout", "job.retried", "job.resend",
            "job.cancelled", "job.dry_run")


def _back(path: str, message: str) -> Response:
    return RedirectResponse(f"{path}?msg={quote(message)}", status_code=303)


# ---------------------------------------------------------------- dashboard
def dashboard_data(ctx: Ctx) -> dict[str, Any]:
    config = ctx.state.config
    limit = config.web.health_worker_max_age_s
    with ctx.state.factory() as session:
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        sends = dict(session.execute(select(Send.state, func.count()).group_by(Send.state)).all())
        nodes = [{"details": r.details or {}, "age_s": round(age, 1), "process": r.process}
                 for r, age in latest(session, "node")]
        workers = [{"process": r.process, "age_s": round(age, 1), "alive": age <= limit, "details": r.details or {}}
                   for r, age in latest(session, "worker")]
        errors = session.execute(select(Job).where(Job.state.in_(("failed", "dead-letter")))
                                 .order_by(Job.updated_at.desc()).limit(8)).scalars().all()
        remind = []
        if config.review.remind_after_min is not None:
            before = utcnow() - timedelta(minutes=config.review.remind_after_min)
            remind = session.execute(select(Job).where(Job.state == "awaiting_review", Job.updated_at < before)
                                     .order_by(Job.updated_at)).scalars().all()
        waiting = jobs.get("awaiting_review", 0)
    disk = shutil.disk_usage(config.storage.root)
    return {"jobs": {s: jobs.get(s, 0) for s in STATES}, "sends": sends, "nodes": nodes[:3],
            "workers": [w for w in workers if w["alive"]] + [w for w in workers if not w["alive"]][:3],
            "alive": sum(w["alive"] for w in workers), "errors": errors, "remind": remind, "waiting": waiting,
            "disk": {"free_mb": disk.free // 2**20, "total_mb": disk.total // 2**20,
                     "min_free_mb": config.storage.min_free_mb,
                     "ok": disk.free // 2**20 >= config.storage.min_free_mb},
            "now": utcnow(), "aware": aware}


def dashboard(ctx: Ctx) -> Response:
    return ctx.render("dashboard.html", **dashboard_data(ctx))


def dashboard_panel(ctx: Ctx) -> Response:
    return ctx.render("_dashboard_panel.html", **dashboard_data(ctx))


# ---------------------------------------------------------------- jobs
def _filtered_jobs(ctx: Ctx) -> tuple[list[Job], dict[str, str]]:
    q = {k: ctx.request.query_params.get(k, "").strip() for k in ("state", "ae", "since", "until", "roi")}
    stmt = select(Job).order_by(Job.id.desc()).limit(500)
    if q["state"]:
        stmt = stmt.where(Job.state == q["state"])
    if q["ae"]:
        stmt = stmt.where(Job.calling_ae == q["ae"])
    for key, op in (("since", ">="), ("until", "<")):
        if q[key]:
            try:
                when = datetime.fromisoformat(q[key])
            except ValueError:
                continue
            when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
            stmt = stmt.where(Job.created_at >= when if op == ">=" else Job.created_at < when)
    with ctx.state.factory() as session:
        rows = list(session.execute(stmt).scalars())
    if q["roi"]:
        needle = q["roi"].lower()
        rows = [j for j in rows if any(needle in str(p.get("structure", "")).lower() for p in (j.prompts or []))]
    return rows, q


def jobs_page(ctx: Ctx) -> Response:
    rows, q = _filtered_jobs(ctx)
    return ctx.render("jobs.html", jobs=rows, q=q, states=STATES, query=str(ctx.request.url.query),
                      confidences=_confidences(rows), uncertain_below=ctx.state.config.review.uncertain_below)


def jobs_table(ctx: Ctx) -> Response:
    rows, q = _filtered_jobs(ctx)
    return ctx.render("_jobs_table.html", jobs=rows, q=q, confidences=_confidences(rows),
                      uncertain_below=ctx.state.config.review.uncertain_below)


def _confidences(jobs: list[Job]) -> dict[int, list[tuple[str, float]]]:
    """Per job, each structure's confidence (from its result's review.json)."""
    from web.review import structure_confidences

    return {j.id: structure_confidences(j) for j in jobs if j.result_path}


def job_detail(ctx: Ctx) -> Response:
    job_id = int(ctx.request.path_params["job_id"])
    with ctx.state.factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            return PlainTextResponse(f"no job {job_id}", status_code=404)
        rows = audit_log.query(session, job_id=job_id)
        complete = session.execute(select(AuditEntry).where(
            AuditEntry.event == "series.complete", AuditEntry.series_instance_uid == job.series_instance_uid)
            .order_by(AuditEntry.id).limit(1)).scalar() if job.series_instance_uid else None
        sends = session.execute(select(Send).where(Send.job_id == job_id).order_by(Send.id)).scalars().all()
        reviews = list(actions.decisions(session, job_id).values())
    events = sorted([r for r in rows if r.event in TIMELINE or r.event.startswith("job.")] +
                    ([complete] if complete is not None else []), key=lambda r: r.at)
    timeline, first = [], None
    for r in events:
        at = datetime.fromisoformat(r.at)
        first = first or at
        timeline.append({"at": r.at[:19].replace("T", " "), "event": r.event, "t_s": (at - first).total_seconds(),
                         "details": json.loads(r.details or "{}")})
    attempts: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r.event.startswith("send."):
            d = json.loads(r.details or "{}")
            if "send_id" in d:
                attempts.setdefault(int(d["send_id"]), []).append({"at": r.at[:19].replace("T", " "), "event": r.event,
                                                                   **d})
    return ctx.render("job.html", job=job, timeline=timeline, sends=sends, attempts=attempts, reviews=reviews,
                      structures=[p.get("structure") for p in (job.prompts or [])],
                      destination=destination_text(ctx.state.config, job))


def _job_action(ctx: Ctx, name: str) -> Response:
    job_id = int(ctx.request.path_params["job_id"])
    s = ctx.state
    try:
        if name == "retry":
            out = actions.retry(s.factory, job_id, ctx.user.name)
        elif name == "resend":
            out = actions.resend(s.factory, s.config, job_id, ctx.user.name)
        else:
            out = actions.cancel(s.factory, job_id, ctx.user.name)
    except actions.ActionError as exc:
        return _back(f"/jobs/{job_id}", f"{name} refused: {exc}")
    return _back(f"/jobs/{job_id}", f"{name}: {out.message}")


def job_retry(ctx: Ctx) -> Response:
    return _job_action(ctx, "retry")


def job_resend(ctx: Ctx) -> Response:
    return _job_action(ctx, "resend")


def job_cancel(ctx: Ctx) -> Response:
    return _job_action(ctx, "cancel")


# ---------------------------------------------------------------- quarantine
def quarantine_page(ctx: Ctx) -> Response:
    return ctx.render("quarantine.html", items=actions.quarantined_files(ctx.state.config))


def _quarantine_action(ctx: Ctx, release: bool) -> Response:
    item = ctx.form.get("item", "")
    s = ctx.state
    try:
        out = (actions.release if release else actions.discard)(s.factory, s.config, item, ctx.user.name)
    except actions.ActionError as exc:
        return _back("/quarantine", str(exc))
    return _back("/quarantine", out.message)


def quarantine_release(ctx: Ctx) -> Response:
    return _quarantine_action(ctx, True)


def quarantine_discard(ctx: Ctx) -> Response:
    return _quarantine_action(ctx, False)


# ---------------------------------------------------------------- batch
def _runs(ctx: Ctx) -> dict[str, Path]:
    """Every batch run with a drift report, newest first, by a key for the URL: those under batch.out and those
    written elsewhere (`rtprop batch --out`), which the audit's batch.finished rows name."""
    folders: set[Path] = set()
    out = Path(ctx.state.config.batch.out)
    if out.is_dir():
        folders |= {p for p in out.iterdir() if p.is_dir()}
    with ctx.state.factory() as session:
        for (details,) in session.execute(select(AuditEntry.details).where(AuditEntry.event == "batch.finished")):
            folder = json.loads(details or "{}").get("out")
            if folder:
                folders.add(Path(folder))
    runs = sorted((p for p in folders if (p / "drift.csv").is_file()), key=lambda p: (p.name, str(p)), reverse=True)
    names = Counter(p.name for p in runs)
    return {p.name if names[p.name] == 1 else f"{p.name}-{hashlib.sha256(str(p).encode()).hexdigest()[:6]}": p
            for p in runs}


def batch_page(ctx: Ctx) -> Response:
    runs = _runs(ctx)
    chosen = ctx.request.query_params.get("run") or next(iter(runs), "")
    rows: list[dict[str, str]] = []
    run = runs.get(chosen)
    if run is not None:
        with open(run / "drift.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    return ctx.render("batch.html", runs={k: str(p.parent) for k, p in runs.items()}, run=chosen if run else "",
                      rows=rows, montage=bool(run and (run / "montage.png").is_file()))


def batch_montage(ctx: Ctx) -> Response:
    run = _runs(ctx).get(ctx.request.path_params["run"])
    if run is None or not (run / "montage.png").is_file():
        return PlainTextResponse("no such montage", status_code=404)
    return FileResponse(run / "montage.png", media_type="image/png")


# ---------------------------------------------------------------- audit
def audit_page(ctx: Ctx) -> Response:
    q = {k: ctx.request.query_params.get(k, "").strip() for k in ("job", "study", "ae", "user", "since", "until",
                                                                   "event")}
    with ctx.state.factory() as session:
        stmt = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1000)
        if q["job"].isdigit():
            stmt = stmt.where(AuditEntry.job_id == int(q["job"]))
        if q["study"]:
            stmt = stmt.where(AuditEntry.study_instance_uid == q["study"])
        if q["ae"]:
            stmt = stmt.where(AuditEntry.calling_ae == q["ae"])
        if q["event"]:
            stmt = stmt.where(AuditEntry.event.like(q["event"].replace("*", "%")))
        if q["since"]:
            stmt = stmt.where(AuditEntry.at >= q["since"])
        if q["until"]:
            stmt = stmt.where(AuditEntry.at < q["until"])
        if q["user"]:  # details is canonical JSON: "user":"NAME"
            stmt = stmt.where(or_(AuditEntry.details.like(f'%"user":{json.dumps(q["user"])}%')))
        rows = list(session.execute(stmt).scalars())
    verified = None
    if ctx.request.query_params.get("verify"):
        with ctx.state.factory() as session:
            count, problems, _ = verify_all(session)
        verified = {"rows": count, "ok": not problems, "problems": problems[:20]}
    return ctx.render("audit.html", rows=rows, q=q, verified=verified)


# ---------------------------------------------------------------- login locks (web/auth.py LoginLimiter)
def logins_page(ctx: Ctx) -> Response:
    return ctx.render("logins.html", locks=ctx.state.limiter.locks(), limiter=ctx.state.limiter)


def logins_clear(ctx: Ctx) -> Response:
    address, user = ctx.form.get("address", ""), ctx.form.get("user", "")
    if not ctx.state.limiter.clear(address, user):
        return _back("/logins", "no such lock (it may have expired)")
    with transaction(ctx.state.factory) as session:
        audit_log.record(session, "web.login_lock_cleared", component="web", user=ctx.user.name,
                         locked_address=address, locked_user=user, client=client_address(ctx.request))
    return _back("/logins", f"lock on {user or 'every name'} from {address} cleared")


def routes() -> list[BaseRoute]:
    return [
        route("/", dashboard),
        route("/dashboard/panel", dashboard_panel),
        route("/jobs", jobs_page),
        route("/jobs/table", jobs_table),
        route("/jobs/{job_id:int}", job_detail),
        route("/jobs/{job_id:int}/retry", job_retry, role="admin", methods=("POST",)),
        route("/jobs/{job_id:int}/resend", job_resend, role="admin", methods=("POST",)),
        route("/jobs/{job_id:int}/cancel", job_cancel, role="admin", methods=("POST",)),
        route("/quarantine", quarantine_page),
        route("/quarantine/release", quarantine_release, role="admin", methods=("POST",)),
        route("/quarantine/discard", quarantine_discard, role="admin", methods=("POST",)),
        route("/batch", batch_page),
        route("/batch/{run}/montage.png", batch_montage),
        route("/audit", audit_page),
        route("/logins", logins_page, role="admin"),
        route("/logins/clear", logins_clear, role="admin", methods=("POST",)),
    ]
