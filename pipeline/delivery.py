"""Delivery: the one exit of every RTSTRUCT that leaves the node, and how its job follows the send.

- `deliver` is THE exit: a job's result (pipeline/runner.py), a nightly batch result
  (pipeline/batch.py, a job of kind `batch`) and a reviewer's accepted result (pipeline/actions.py)
  are all handed to it, so every rule applies to each of them: the dry run, the guard's hold, review
  before send, the check that the file is the one written and file-checked, and the route stored on
  the job when it was created (dicom_node/routing.py `JobRoute`). It moves the job validated ->
  sending (a row in the durable outbound queue, dicom_node/scu.py, in the same transaction), -> sent
  (a drop-in case: the file goes to the drop-in outbox), -> awaiting_review, -> failed (no
  destination), or leaves it validated (dry run: processed and audited, never sent).
- `reconcile_sends`: a `sending` job follows its send row: sent (with or without a warning),
  or dead-letter when the sender gave up.
- `report_dropin_failures`: a dropped case whose job failed gets `<case>.job<N>.failed.json` in
  the drop-in outbox, once.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from converters.files import copy_atomic
from db.engine import transaction
from db.schema import Job, Send
from dicom_node.routing import JobRoute, route_for_job
from pipeline import jobs as J

LOG = logging.getLogger("rtprop.pipeline.delivery")


def job_route(config: Config, job: Job) -> JobRoute:
    """Where `job`'s result goes: the route stored when it was created; a job created before routes were
    stored (revision 0006_job_routes) is routed now, by `config`."""
    if job.route is not None:
        return JobRoute.from_json(job.route)
    return route_for_job(config, job.calling_ae, dropin=bool(job.dropin_case))


def destination_text(config: Config, job: Job) -> str:
    """Where `job`'s result goes, in one line for people (`rtprop jobs show`, the web app's job page)."""
    text = job_route(config, job).describe()
    return text if job.route is not None else f"{text} (by the routes of the process that delivers it)"


def deliver(session: Session, config: Config, job: Job, path: Path, *, reviewed: bool = False,
            implausible: list[str] | None = None) -> str:
    """Hand a validated job's RTSTRUCT `path` to the exit, inside the caller's transaction; returns the job's
    new state. The one way out of the node for every result (see the module doc).

    `path` must be the job's checked result (`job.result_path`, unchanged since: its sha256), or a file
    made from it by a reviewer (`reviewed`). Before anything leaves, a person may have to look
    (-> awaiting_review): review.before_send for the calling AE, or a result that looks implausible
    (`implausible`: the guard's reasons) while guard.hold_implausible is on. `reviewed`: a reviewer
    accepted it (pipeline/actions.py).
    """
    from dicom_node.scu import enqueue

    route = job_route(config, job)
    problem = _not_as_checked(job, Path(path))
    if problem:
        J.transition(session, job, "failed", error=f"not sent: {problem}")
        LOG.error("job %s: not sent: %s", job.id, problem)
        return "failed"
    if job.dry_run or route.dry_run:
        J.audit_job(session, job, "job.dry_run", result_path=str(path), route=route.describe(),
                    decision="shadow mode: not sent")
        return "validated"
    if not reviewed and implausible and config.guard.hold_implausible:
        reason = "held, the result looks implausible: " + "; ".join(implausible)
        J.transition(session, job, "awaiting_review", event="job.held", waiting_for=reason[:2000],
                     details={"result_path": str(path), "reasons": implausible})
        LOG.warning("job %s %s", job.id, reason)
        return "awaiting_review"
    if not reviewed and config.review.required_for(job.calling_ae):
        J.transition(session, job, "awaiting_review", details={"result_path": str(path)})
        return "awaiting_review"
    if route.kind == "dropin":
        target = dropin_output(config, job, path)
        J.transition(session, job, "sent", details={"delivered_to": str(target), "via": "dropin-outbox"})
        return "sent"
    if route.destination is None:
        J.transition(session, job, "failed", error=f"no destination: {route.error}; result kept at {path}")
        return "failed"
    send = enqueue(session, path, route.destination, job_id=job.id, patient_id_hash=job.patient_id_hash)
    J.transition(session, job, "sending", details={"send_id": send.id, "destination": route.describe()})
    return "sending"


def prompt_received_again(session: Session, config: Config, sop_uid: str, calling_ae: str) -> str:
    """A TPS sent prompt RTSTRUCT `sop_uid` again (an identical copy: the archive keeps the first). If its job
    delivered by C-STORE, its result goes again, the same SOP Instance UID (a TPS that lost it gets it; one
    that has it stores it once); otherwise the log and the audit say what the job is doing. Returns that."""
    from dicom_node.scu import enqueue

    job = J.find_job_for_rtstruct(session, sop_uid)
    if job is None:
        return ""  # no job yet: the series is being completed, the job comes then
    route = job_route(config, job)
    last = session.execute(select(Send).where(Send.job_id == job.id).order_by(Send.id.desc()).limit(1)).scalar()
    if job.state == "sent" and last is not None and route.destination is not None and Path(last.path).is_file():
        send = enqueue(session, last.path, route.destination, job_id=job.id, patient_id_hash=job.patient_id_hash,
                       again=True)
        said = f"result {job.result_sop_instance_uid or Path(last.path).name} sent again to {route.describe()} " \
               f"(send {send.id})"
    elif job.state == "sent":
        said = f"already delivered to {route.describe()}: nothing sent again"
    elif job.dry_run and job.state == "validated":
        said = f"{route.describe()}: nothing is sent"
    elif job.state in ("received", "queued", "running", "validated", "sending"):
        said = f"still running ({job.state}): its result goes out when it is done"
    elif job.state == "awaiting_review":
        said = "waiting for a reviewer: its result goes out when accepted"
    else:
        said = f"{job.state}{': ' + job.error[:300] if job.error else ''}: nothing sent (`rtprop jobs retry {job.id}`)"
    J.audit_job(session, job, "job.prompt_again", calling_ae_again=calling_ae[:16], state=job.state, outcome=said)
    LOG.info("job %s: prompt RTSTRUCT %s received again from %s: %s", job.id, sop_uid, calling_ae, said)
    return said


def prompt_again_handler(factory: sessionmaker[Session], config: Config) -> Callable[[str, str, str], None]:
    """The receive path's hook (dicom_node/storage.py `on_duplicate`): prompt RTSTRUCTs received again."""
    from pydicom.uid import RTStructureSetStorage

    def handle(sop_class_uid: str, sop_uid: str, calling_ae: str) -> None:
        if sop_class_uid == RTStructureSetStorage:
            with transaction(factory) as session:
                prompt_received_again(session, config, sop_uid, calling_ae)

    return handle


def _not_as_checked(job: Job, path: Path) -> str:
    """Why `path` may not leave as `job`'s result ('' = it may): gone, or not the file that was file-checked."""
    from pipeline.write_result import sha256_file

    if not path.is_file():
        return f"the result {path} is no longer there"
    if str(path) == job.result_path and job.result_sha256 and sha256_file(path) != job.result_sha256:
        return f"the result {path} changed after its file check (sha256 differs from the one recorded)"
    return ""


def dropin_output(config: Config, job: Job, path: Path) -> Path:
    """Copy the result into the drop-in outbox as `<case>__<file name>` (complete or absent, never half)."""
    outbox = config.dropin.outbox
    outbox.mkdir(parents=True, exist_ok=True)
    return copy_atomic(path, outbox / f"{job.dropin_case or job.study_instance_uid}__{path.name}")


def reconcile_sends(factory: sessionmaker[Session], job_ids: list[int] | None = None) -> None:
    """`sending` jobs (or those of `job_ids`) follow their send rows: sent when the peer stored it,
    dead-letter when the sender gave up."""
    with factory() as session:
        stmt = select(Job.id).where(Job.state == "sending")
        ids = session.execute(stmt if job_ids is None else stmt.where(Job.id.in_(job_ids))).scalars().all()
    for job_id in ids:
        with transaction(factory) as session:
            job = session.get(Job, job_id)
            if job.state != "sending":
                continue
            sends = session.execute(select(Send).where(Send.job_id == job_id)).scalars().all()
            done = next((s for s in sends if s.state == "sent"), None)
            if done is not None:
                J.transition(session, job, "sent", details={
                    "send_id": done.id, "status": f"0x{done.last_status:04X}" if done.last_status is not None else "",
                    "outcome": done.outcome, "destination_ae": done.destination_ae})
            elif sends and all(s.state == "dead-letter" for s in sends):
                J.transition(session, job, "dead-letter", error=f"send dead-lettered: {sends[-1].last_error}")


def report_dropin_failures(factory: sessionmaker[Session], config: Config) -> None:
    """A dropped case whose job failed gets <case>.job<N>.failed.json in the drop-in outbox (once)."""
    outbox = config.dropin.outbox
    with factory() as session:
        rows = session.execute(select(Job).where(Job.dropin_case != "",
                                                 Job.state.in_(("failed", "dead-letter")))).scalars().all()
    for job in rows:
        marker = outbox / f"{job.dropin_case}.job{job.id}.failed.json"
        if marker.exists():
            continue
        outbox.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"job_id": job.id, "state": job.state, "error": job.error,
                                      "rtstruct_sop_instance_uid": job.rtstruct_sop_instance_uid}, indent=1))
        LOG.info("drop-in case %s: job %s %s, %s written", job.dropin_case, job.id, job.state, marker.name)
