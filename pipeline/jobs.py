"""The job state machine, kept in the `jobs` table: every hand-over is a row, so any process may die.

States and the only transitions allowed (anything else raises `JobStateError`):

    received  -> queued        the image series is complete and prompts were found
    received  -> failed        no prompt in the RTSTRUCT, no usable or an ambiguous series, series
                               incomplete, or none arrived within pipeline.series_wait_s
    received  -> ignored       an RTSTRUCT rtprop wrote itself, sent back to the node: never a prompt
    queued    -> running       a worker claimed it (attempts + 1)
    running   -> validated     propagated, RTSTRUCT written, file check passed
    running   -> queued        the worker died or timed out, or a transient fault (full disk, busy
                               database); attempts < pipeline.job_max_attempts (with backoff)
    running   -> failed        an error in the input (bad prompt, unreadable series) or the file check
                               failed (the RTSTRUCT is then held in quarantine with the reason)
    running   -> dead-letter   it died, timed out or hit transient faults pipeline.job_max_attempts times
    validated -> sending       queued for C-STORE (a row in `sends`)
    validated -> sent          delivered by file (drop-in outbox)
    validated -> failed        no destination for the calling AE (the RTSTRUCT stays in the outbox)
    validated -> awaiting_review  a person decides first: review.before_send for the calling AE, or
                               the result looks implausible (guard.hold_implausible)
    awaiting_review -> sending    accepted: queued for C-STORE exactly as `validated -> sending`
    awaiting_review -> sent       accepted, drop-in case (delivered to the drop-in outbox)
    awaiting_review -> failed     accepted, but no destination for the calling AE
    awaiting_review -> rejected   rejected by the reviewer: nothing is sent, the job is closed
    sending   -> sent          the peer stored it (0x0000, or a warning status: "sent with warning")
    sending   -> dead-letter   the send gave up (dead-lettered by the sender)

Moves only a person makes (`transition(..., by_person=True)`: `rtprop jobs retry ID`, the web app,
pipeline/actions.py; audited with the person's name; `PERSON_TRANSITIONS`):

    failed | dead-letter            -> queued     retry a job that had prompts (attempts start again)
    failed | dead-letter            -> received   retry one that failed before its prompts were found
    dead-letter                     -> sending    re-send the validated result
    received | queued | awaiting_review -> cancelled

Every move to `queued` also enqueues the job's task for the job engine in the same transaction
(distributed mode, PostgreSQL: db/queue.py; `claim` is then called by that task). On SQLite the
workers' own loop polls for queued rows (`claim_next`).

A job of kind `batch` (a nightly batch result handed to the exit, pipeline/batch.py) is created
`validated` and goes on from there like any other (`create_batch_job`).

A dry-run job ends in `validated` with `dry_run` set: processed and audited, never sent.
`sent`, `failed`, `dead-letter`, `ignored`, `rejected` and `cancelled` are final for the machine (a
reviewer's reject is final; only a person's retry leaves failed/dead-letter). Every transition
writes an audit row in the same transaction (`job.<event>`), with UIDs, AE titles and the patient
key only (and the user's name for a person's move).
"""
from __future__ import annotations

import logging
import threading
import weakref
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import queue
from db.audit import record
from db.engine import transaction
from db.schema import Job, aware, utcnow
from dicom_node.routing import JobRoute

LOG = logging.getLogger("rtprop.pipeline.jobs")

STATES = ("received", "queued", "running", "validated", "awaiting_review", "sending", "sent", "failed",
          "dead-letter", "ignored", "rejected", "cancelled")
FINAL_STATES = frozenset({"sent", "failed", "dead-letter", "ignored", "rejected", "cancelled"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "received": frozenset({"queued", "failed", "ignored"}),
    "queued": frozenset({"running"}),
    "running": frozenset({"validated", "queued", "failed", "dead-letter"}),
    "validated": frozenset({"sending", "sent", "failed", "awaiting_review"}),
    "awaiting_review": frozenset({"sending", "sent", "failed", "rejected"}),
    "sending": frozenset({"sent", "dead-letter"}),
    "sent": frozenset(),
    "failed": frozenset(),
    "dead-letter": frozenset(),
    "ignored": frozenset(),
    "rejected": frozenset(),
    "cancelled": frozenset(),
}
# Moves only a person makes (retry, re-send, cancel), on top of the machine's own.
PERSON_TRANSITIONS: dict[str, frozenset[str]] = {
    "failed": frozenset({"queued", "received"}),
    "dead-letter": frozenset({"queued", "received", "sending"}),
    "received": frozenset({"cancelled"}),
    "queued": frozenset({"cancelled"}),
    "awaiting_review": frozenset({"cancelled"}),
}
# Audit event written for each target state (job.claimed for running, ...).
EVENTS = {"queued": "job.queued", "running": "job.claimed", "validated": "job.validated", "sending": "job.sending",
          "sent": "job.sent", "failed": "job.failed", "dead-letter": "job.dead_letter", "ignored": "job.ignored",
          "awaiting_review": "job.awaiting_review", "rejected": "job.rejected", "cancelled": "job.cancelled",
          "received": "job.received"}


class JobStateError(RuntimeError):
    """A transition the state machine does not allow (names the job, its state and the target)."""


def check_transition(job_id: int | None, current: str, target: str, *, by_person: bool = False) -> None:
    allowed_set = TRANSITIONS.get(current, frozenset()) | (PERSON_TRANSITIONS.get(current, frozenset())
                                                            if by_person else frozenset())
    if target not in allowed_set:
        allowed = ", ".join(sorted(allowed_set)) or "none (final state)"
        who = "by a person " if by_person else ""
        raise JobStateError(f"job {job_id}: {current} -> {target} is not allowed {who}(from {current}: {allowed})")


def audit_job(session: Session, job: Job, event: str, **details: Any) -> None:
    record(session, event, component="pipeline", job_id=job.id, study_instance_uid=job.study_instance_uid,
           series_instance_uid=job.series_instance_uid, sop_instance_uid=job.rtstruct_sop_instance_uid,
           calling_ae=job.calling_ae, patient_id_hash=job.patient_id_hash, **details)


def transition(session: Session, job: Job, target: str, *, event: str | None = None,
               expect_owner: str | None = None, details: dict[str, Any] | None = None, by_person: bool = False,
               **fields: Any) -> Job:
    """Move `job` to `target` inside the caller's transaction; set the columns `fields`; audit (with
    `details`). Refuses illegal moves (`by_person`: a person's action, which may also retry, re-send, cancel).

    The UPDATE is conditional on the state the row had (compare-and-set), so two processes acting
    on one stale object cannot both move it; `expect_owner` also requires `claimed_by` to match.
    """
    session.refresh(job)
    current = job.state
    check_transition(job.id, current, target, by_person=by_person)
    if expect_owner is not None and job.claimed_by != expect_owner:
        raise JobStateError(f"job {job.id}: claimed by {job.claimed_by!r}, not {expect_owner!r}")
    values = {"state": target, "updated_at": utcnow(), "waiting_for": "", **fields}  # waits end with the state
    done = session.execute(update(Job).where(Job.id == job.id, Job.state == current).values(**values)
                           .execution_options(synchronize_session=False)).rowcount
    if not done:
        raise JobStateError(f"job {job.id}: state changed under us (was {current})")
    session.refresh(job)
    if target == "queued":
        queue.defer(session, queue.TASK_PROPAGATE, job.queue or "cpu", {"job_id": job.id},
                    scheduled_at=aware(job.not_before))
    logged = {k: v for k, v in fields.items() if k in ("error", "attempts", "result_sha256", "file_check_dice",
                                                        "claimed_by", "backend", "result_path", "not_before")}
    audit_job(session, job, event or EVENTS[target], previous_state=current, **logged, **(details or {}))
    LOG.info("job %s: %s -> %s", job.id, current, target)
    return job


def find_job_for_rtstruct(session: Session, rtstruct_uid: str, kind: str = "prompt") -> Job | None:
    return session.execute(select(Job).where(Job.rtstruct_sop_instance_uid == rtstruct_uid, Job.kind == kind)
                           .limit(1)).scalar()


def create_job(session: Session, *, rtstruct_uid: str, study_uid: str, calling_ae: str, series_uid: str = "",
               kind: str = "prompt", dry_run: bool = False, patient_id_hash: str = "",
               dropin_case: str = "", route: JobRoute | None = None) -> tuple[Job, bool]:
    """The job of one prompt RTSTRUCT, created once: returns (job, created).

    `route`: where its result goes, decided now from the receiving node's routes (dicom_node/routing.py
    `route_for_job`) and kept on the job; its dry_run is the job's. None (tests, older callers): routed
    when it is delivered. Called inside a write-locked transaction (BEGIN IMMEDIATE), so the look-up and
    the insert are one atomic step: two discovery loops can never create two jobs for one RTSTRUCT.
    """
    existing = find_job_for_rtstruct(session, rtstruct_uid, kind)
    if existing is not None:
        return existing, False
    now = utcnow()
    dry_run = dry_run or (route is not None and route.dry_run)
    job = Job(state="received", kind=kind, series_instance_uid=series_uid, study_instance_uid=study_uid,
              rtstruct_sop_instance_uid=rtstruct_uid, calling_ae=calling_ae[:16], dry_run=dry_run, attempts=0,
              patient_id_hash=patient_id_hash, dropin_case=dropin_case, created_at=now, updated_at=now,
              waiting_since=now, route=route.to_json() if route is not None else None)
    session.add(job)
    session.flush()
    audit_job(session, job, "job.created", kind=kind, dry_run=dry_run,
              route=route.describe() if route is not None else "decided at delivery")
    return job, True


def create_batch_job(session: Session, *, rtstruct_uid: str, result_uid: str, result_path: str, result_sha256: str,
                     study_uid: str, series_uid: str, calling_ae: str, patient_id_hash: str, prompts: list[dict[str, Any]],
                     route: JobRoute, **fields: Any) -> tuple[Job, bool]:
    """The job of one nightly batch result (kind `batch`), created once per result SOP Instance UID, already
    `validated`: the batch computed and file-checked it (pipeline/recontour.py). It exists so that the
    result leaves through the one exit (pipeline/delivery.py `deliver`) under every rule a job's result
    does. `rtstruct_uid` is the archived RTSTRUCT the ROI was re-contoured from; returns (job, created)."""
    existing = session.execute(select(Job).where(Job.kind == "batch", Job.result_sop_instance_uid == result_uid)
                               .limit(1)).scalar()
    if existing is not None:
        return existing, False
    now = utcnow()
    job = Job(state="validated", kind="batch", series_instance_uid=series_uid, study_instance_uid=study_uid,
              rtstruct_sop_instance_uid=rtstruct_uid, result_sop_instance_uid=result_uid, calling_ae=calling_ae[:16],
              dry_run=route.dry_run, attempts=1, patient_id_hash=patient_id_hash, prompts=prompts,
              result_path=result_path, result_sha256=result_sha256, route=route.to_json(), created_at=now,
              updated_at=now, **fields)
    session.add(job)
    session.flush()
    audit_job(session, job, "job.created", kind="batch", dry_run=job.dry_run, route=route.describe(),
              result_path=result_path, result_sha256=result_sha256)
    return job, True


def claim_next(factory: sessionmaker[Session], worker: str) -> Job | None:
    """Claim the oldest queued job for `worker`: one conditional UPDATE inside the write lock."""
    with transaction(factory) as session:
        now = utcnow()
        job_id = session.execute(select(Job.id).where(
            Job.state == "queued", or_(Job.not_before.is_(None), Job.not_before <= now)).order_by(Job.id)
            .limit(1)).scalar()
        if job_id is None:
            return None
        return _claim(session, job_id, worker, now)


def claim(factory: sessionmaker[Session], job_id: int, worker: str) -> Job | None:
    """Claim job `job_id` if it is queued and due (the engine's task does this first); None: nothing to do
    (already run, running elsewhere, cancelled, or waiting for its backoff: another message is due then)."""
    with transaction(factory) as session:
        return _claim(session, job_id, worker, utcnow())


def _claim(session: Session, job_id: int, worker: str, now: datetime) -> Job | None:
    done = session.execute(update(Job).where(
        Job.id == job_id, Job.state == "queued", or_(Job.not_before.is_(None), Job.not_before <= now)).values(
        state="running", claimed_by=worker, heartbeat_at=now, updated_at=now, attempts=Job.attempts + 1)
        .execution_options(synchronize_session=False)).rowcount
    if not done:
        return None
    job = session.get(Job, job_id)
    session.refresh(job)
    audit_job(session, job, "job.claimed", previous_state="queued", worker=worker, attempt=job.attempts)
    return job


def heartbeat(factory: sessionmaker[Session], job_id: int, worker: str) -> bool:
    """Refresh the claim; False if the job is no longer ours (recovered by another process)."""
    with transaction(factory) as session:
        return bool(session.execute(update(Job).where(Job.id == job_id, Job.state == "running",
                                                      Job.claimed_by == worker)
                                    .values(heartbeat_at=utcnow())
                                    .execution_options(synchronize_session=False)).rowcount)


def recover_stale(factory: sessionmaker[Session], *, heartbeat_timeout_s: float, max_attempts: int,
                  owner_alive=None, now: datetime | None = None) -> list[int]:
    """Jobs left `running` by a dead worker go back to `queued` (or `dead-letter` after max_attempts).

    A claim is stale when its heartbeat is older than `heartbeat_timeout_s`, or at once when
    `owner_alive(claimed_by)` says the owning process is gone (same host, pid not running).
    """
    now = now or utcnow()
    moved: list[int] = []

    def lost(job: Job) -> tuple[bool, bool]:
        beat = aware(job.heartbeat_at)
        stale = beat is None or (now - beat).total_seconds() > heartbeat_timeout_s
        dead = bool(owner_alive is not None and job.claimed_by and not owner_alive(job.claimed_by))
        return stale, dead

    with factory() as session:  # a read first: most passes find nothing, and take no write lock
        if not any(any(lost(job)) for job in session.execute(select(Job).where(Job.state == "running")).scalars()):
            return moved
    with transaction(factory) as session:
        for job in session.execute(select(Job).where(Job.state == "running")).scalars().all():
            stale, dead = lost(job)
            if not (stale or dead):
                continue
            why = "owner process gone" if dead else f"no heartbeat for more than {heartbeat_timeout_s:g} s"
            if job.attempts >= max_attempts:
                transition(session, job, "dead-letter", event="job.dead_letter", claimed_by="",
                           error=f"worker lost {job.attempts} time(s) ({why}); giving up after {max_attempts}")
            else:
                transition(session, job, "queued", event="job.recovered", claimed_by="",
                           error=f"attempt {job.attempts} lost: {why}")
            moved.append(job.id)
    if moved:
        LOG.warning("recovered %d job(s) left running by a lost worker: %s", len(moved), moved)
    return moved


def counts(session: Session) -> dict[str, int]:
    """Number of jobs per state (for status output and tests)."""
    out = {s: 0 for s in STATES}
    for (state,) in session.execute(select(Job.state)).all():
        out[state] = out.get(state, 0) + 1
    return out


def stale_before(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


# --------------------------------------------------------------------------- waking idle workers
_WAKES: "weakref.WeakSet[threading.Event]" = weakref.WeakSet()


def wake_event() -> threading.Event:
    """An event a worker waits on while idle; `wake_workers` sets it (pipeline/worker.py)."""
    wake = threading.Event()
    _WAKES.add(wake)
    return wake


def wake_workers() -> None:
    """Work arrived for this process's workers: their idle wait ends now, not at their next poll."""
    for wake in list(_WAKES):
        wake.set()


def wake_workers_after_commit(session: Session) -> None:
    """Wake this process's workers once `session` commits (what they are woken for is visible to them then)."""
    event.listen(session, "after_commit", lambda _session: wake_workers(), once=True)
