"""What a person does to a job or a quarantined file: review, retry, re-send, cancel, release, discard.

Plain functions over the database, called by the web app (web/) and scriptable from the CLI. Each
runs in ONE write-locked transaction (the state check, the change and its audit row together), so
two people clicking at once cannot both act: the second gets `ActionError`. Every audit row
carries `user=` the person's name.

Review (job state `awaiting_review`, see pipeline/jobs.py): a decision per ROI of the result's newest
revision (a reviewer's corrections, pipeline/revisions.py), final once made. When every ROI has one:
all rejected -> `rejected` (nothing sent); all accepted -> that revision goes out by
`pipeline.delivery.deliver` (the same durable queue as an unreviewed job, so it is sent exactly once);
some rejected -> a copy holding only the accepted ROIs (new SOP Instance UID,
converters.rtstruct_subset) goes out instead.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.errors import UserError
from config.schema import Config
from db.audit import record
from db.engine import transaction
from db.schema import Job, Review, Send, utcnow
from pipeline import jobs as J
from pipeline.revisions import RevisionConflict, current, result_rois

LOG = logging.getLogger("rtprop.pipeline.actions")
DECISIONS = ("accept", "reject")


class ActionError(UserError):
    """An action that cannot be done in the job's present state; the message names job, state and ROI."""


@dataclass
class Outcome:
    job_id: int
    state: str
    message: str
    details: dict[str, Any]


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise ActionError(f"no job {job_id}")
    session.refresh(job)
    return job


def decisions(session: Session, job_id: int) -> dict[str, Review]:
    """The decision on each reviewed ROI of a job (first one wins: decisions are final)."""
    out: dict[str, Review] = {}
    for row in session.execute(select(Review).where(Review.job_id == job_id).order_by(Review.id)).scalars():
        out.setdefault(row.roi, row)
    return out


def review(factory: sessionmaker[Session], config: Config, job_id: int, user: str, *, roi: str | None,
           decision: str, rating: int | None = None, comment: str = "", revision: int | None = None) -> Outcome:
    """Record `user`'s decision on ROI `roi` (None: every ROI not yet decided) and close the job when all are.

    The decision is on the result's newest revision (pipeline/revisions.py), which is what an accept sends;
    `revision`: the one the reviewer looked at (RevisionConflict if someone corrected it since)."""
    if decision not in DECISIONS:
        raise ActionError(f"decision {decision!r}: expected one of {', '.join(DECISIONS)}")
    if rating is not None and not 1 <= int(rating) <= 5:
        raise ActionError(f"rating {rating}: the edit-effort rating is 1 (none) to 5 (redo)")
    comment = (comment or "")[:2000]
    with transaction(factory) as session:
        job = _job(session, job_id)
        if job.state != "awaiting_review":
            raise ActionError(f"job {job_id} is {job.state}, not awaiting_review: nothing to review "
                              "(a reviewer's decision is final)")
        shown = current(session, job)
        if revision is not None and revision != shown.number:
            raise RevisionConflict(f"job {job_id} is at revision {shown.number}, not {revision}: "
                                   f"{shown.user or 'someone'} corrected it since; look at revision {shown.number} "
                                   "before deciding", shown.number)
        names = result_rois(job.result_path)
        done = decisions(session, job_id)
        if roi is None:
            targets = [n for n in names if n not in done]
        elif roi not in names:
            raise ActionError(f"job {job_id}: no ROI {roi!r} in its result (ROIs: {', '.join(names)})")
        elif roi in done:
            raise ActionError(f"job {job_id}: ROI {roi!r} was already {done[roi].decision}ed by {done[roi].user}")
        else:
            targets = [roi]
        for name in targets:
            session.add(Review(job_id=job_id, roi=name, decision=decision, rating=rating, comment=comment,
                               user=user, at=utcnow()))
            J.audit_job(session, job, "job.review", user=user, roi=name, decision=decision, rating=rating,
                        comment=comment, revision=shown.number)
        session.flush()
        done = decisions(session, job_id)
        if any(n not in done for n in names):
            return Outcome(job_id, job.state, f"{len(targets)} ROI(s) {decision}ed; "
                           f"{sum(n not in done for n in names)} still to review", {"rois": targets})
        accepted = [n for n in names if done[n].decision == "accept"]
        if not accepted:
            J.transition(session, job, "rejected", details={"user": user, "rois": names})
            return Outcome(job_id, "rejected", "rejected: nothing sent", {"rois": names})
        path = shown.rtstruct  # the revision on screen: the job's own result or the reviewers' corrected one
        if len(accepted) < len(names):
            from converters.rtstruct_subset import keep_rois
            from pipeline.write_result import sha256_file

            full = path
            path = keep_rois(path, accepted, path.with_name(f"{path.stem}_accepted.dcm"))
            # the job's result is now what leaves: the accepted ROIs (the full file stays beside it, in the audit)
            job.result_path, job.result_sha256 = str(path), sha256_file(path)
            job.result_sop_instance_uid = str(pydicom.dcmread(path, stop_before_pixels=True,
                                                              specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            session.flush()  # before the exit's transition refreshes the row
            J.audit_job(session, job, "job.result_subset", full_result=str(full), result_path=str(path),
                        result_sha256=job.result_sha256, rois=accepted)
        state = _deliver_reviewed(factory, config, session, job, path)
        J.audit_job(session, job, "job.accepted", user=user, rois=accepted, sent_path=str(path), state=state,
                    revision=shown.number, corrections=shown.corrections)
        return Outcome(job_id, state, f"accepted ({', '.join(accepted)}): {state}", {
            "rois": accepted, "path": str(path), "revision": shown.number})


def _deliver_reviewed(factory: sessionmaker[Session], config: Config, session: Session, job: Job,
                      path: Path) -> str:
    """Hand an accepted result to the one exit (pipeline/delivery.py `deliver`), by the job's own route."""
    from pipeline.delivery import deliver, job_route

    route = job_route(config, job)
    if job.dry_run or route.dry_run:
        raise ActionError(f"job {job.id}: its route is a dry run ({route.describe()}): results are never sent; "
                          "reject to close the job")
    return deliver(session, config, job, path, reviewed=True)


def retry(factory: sessionmaker[Session], job_id: int, user: str, reason: str = "") -> Outcome:
    """A failed or dead-lettered job run again (attempts start again): queued if it had prompts, else back
    to received so that discovery looks at its series again (`rtprop jobs retry`, the web app)."""
    with transaction(factory) as session:
        job = _job(session, job_id)
        if job.state not in ("failed", "dead-letter"):
            raise ActionError(f"job {job_id} is {job.state}: only failed or dead-letter jobs can be retried")
        target = "queued" if job.prompts else "received"
        J.transition(session, job, target, event="job.retried", by_person=True, attempts=0, claimed_by="",
                     error="", not_before=None, waiting_for="", waiting_since=utcnow(),
                     details={"user": user, "reason": reason, "previous_error": (job.error or "")[:500]})
        return Outcome(job_id, target, f"retry: {target}", {})


def resend(factory: sessionmaker[Session], config: Config, job_id: int, user: str) -> Outcome:
    """Queue the job's delivered (or dead-lettered) result for C-STORE again, to its route's destination."""
    from dicom_node.scu import enqueue
    from pipeline.delivery import job_route

    with transaction(factory) as session:
        job = _job(session, job_id)
        last = session.execute(select(Send).where(Send.job_id == job_id).order_by(Send.id.desc()).limit(1)).scalar()
        if job.state not in ("sent", "dead-letter") or last is None:
            raise ActionError(f"job {job_id} is {job.state}"
                              f"{'' if last else ' and was never queued for C-STORE'}: only a sent or "
                              "dead-lettered C-STORE result can be re-sent")
        if not Path(last.path).is_file():
            raise ActionError(f"job {job_id}: its result {last.path} is no longer there")
        route = job_route(config, job)
        if route.dry_run:
            raise ActionError(f"job {job_id}: its route is a dry run ({route.describe()}): nothing is sent")
        if route.destination is None:
            raise ActionError(f"job {job_id}: no destination: {route.describe()}")
        send = enqueue(session, last.path, route.destination, job_id=job_id, patient_id_hash=job.patient_id_hash,
                       again=True)
        details = {"user": user, "send_id": send.id, "destination": route.describe()}
        if job.state == "dead-letter":
            J.transition(session, job, "sending", event="job.resend", by_person=True, error="", details=details)
        else:  # sent stays sent: the send row shows the new attempt's outcome on the job page
            J.audit_job(session, job, "job.resend", **details)
        return Outcome(job_id, job.state, f"re-send queued (send {send.id})", details)


def cancel(factory: sessionmaker[Session], job_id: int, user: str) -> Outcome:
    """Stop a job that has not started or waits for review; nothing is sent."""
    with transaction(factory) as session:
        job = _job(session, job_id)
        if "cancelled" not in J.PERSON_TRANSITIONS.get(job.state, ()):
            raise ActionError(f"job {job_id} is {job.state}: only received, queued or awaiting_review jobs can "
                              "be cancelled")
        J.transition(session, job, "cancelled", by_person=True, details={"user": user})
        return Outcome(job_id, "cancelled", "cancelled", {})


# ---------------------------------------------------------------- quarantine
def quarantined_files(config: Config) -> list[dict[str, Any]]:
    """Every held file under storage.quarantine with its reason (from its .reason.json), newest first."""
    root = Path(config.storage.quarantine)
    items = []
    for reason_path in root.rglob("*.reason.json"):
        rel = reason_path.relative_to(root)
        if rel.parts[0] in ("released", "discarded"):
            continue
        stem = reason_path.name[: -len(".reason.json")]
        data = next((p for p in (reason_path.with_name(stem), reason_path.with_name(stem + ".dcm")) if p.is_file()),
                    None)
        try:
            info = json.loads(reason_path.read_text())
        except (OSError, ValueError):
            info = {"reason": "unreadable reason file"}
        items.append({"id": str(rel), "file": str(data) if data else "", "kind": "job" if rel.parts[0] == "jobs"
                      else "instance", "reason": info.get("reason", ""), "info": info,
                      "mtime": reason_path.stat().st_mtime})
    return sorted(items, key=lambda i: -i["mtime"])


def _held(config: Config, item_id: str) -> dict[str, Any]:
    for item in quarantined_files(config):
        if item["id"] == item_id:
            return item
    raise ActionError(f"no quarantined file {item_id!r}")


def _set_aside(config: Config, item: dict[str, Any], folder: str) -> Path:
    root = Path(config.storage.quarantine)
    target = root / folder / item["id"]
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(root / item["id"]), target)
    if item["file"]:
        shutil.move(item["file"], target.parent / Path(item["file"]).name)
    return target.parent


def release(factory: sessionmaker[Session], config: Config, item_id: str, user: str) -> Outcome:
    """Re-ingest a quarantined instance exactly as a C-STORE would; on success it is set aside in released/."""
    from dicom_node.storage import Received, Store

    item = _held(config, item_id)
    if item["kind"] != "instance" or not item["file"]:
        raise ActionError(f"{item_id}: only received instances with their bytes kept can be released")
    info = item["info"]
    store = Store(config.storage, factory, fsync=config.storage.fsync)
    result = store.ingest(Path(item["file"]).read_bytes(), Received(
        calling_ae=str(info.get("calling_ae", "")), peer_address=str(info.get("peer_address", "")),
        affected_sop_class_uid=str(info.get("affected_sop_class_uid", "")),
        affected_sop_instance_uid=str(info.get("affected_sop_instance_uid", "")),
        transfer_syntax_uid=str(info.get("transfer_syntax_uid", "")), source="import"))
    ok = result.status == 0
    if ok:
        _set_aside(config, item, "released")
    with transaction(factory) as session:
        record(session, "quarantine.released" if ok else "quarantine.release_failed", component="web",
               sop_instance_uid=result.sop_instance_uid, calling_ae=str(info.get("calling_ae", "")), user=user,
               item=item_id, status=f"0x{result.status:04X}", reason=result.reason)
    if not ok:
        raise ActionError(f"{item_id}: re-ingest refused again (0x{result.status:04X}: {result.reason})")
    return Outcome(0, "released", f"released {item_id}: stored as {result.sop_instance_uid}", {})


def discard(factory: sessionmaker[Session], config: Config, item_id: str, user: str) -> Outcome:
    """Take a quarantined file off the list: moved to quarantine/discarded/ (never deleted), audited."""
    item = _held(config, item_id)
    where = _set_aside(config, item, "discarded")
    with transaction(factory) as session:
        record(session, "quarantine.discarded", component="web", user=user, item=item_id, kept_in=str(where),
               reason=item["reason"])
    return Outcome(0, "discarded", f"discarded {item_id} (kept in {where})", {})
