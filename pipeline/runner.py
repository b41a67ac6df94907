"""Running one claimed job to its next resting state: compute it, then record what came of it.

  ok, file check passed -> validated, then handed to delivery (pipeline/delivery.py)
  file check failed      -> failed, the RTSTRUCT held in quarantine with the reasons (job.quarantined)
  the input's fault      -> failed with the reason (never retried: the same input fails the same way)
  a transient fault      -> queued again after a backoff (full disk, busy database, a share away);
                            dead-letter after pipeline.job_max_attempts
  our fault              -> failed with the error and its traceback in the log
  lost (killed, timeout) -> queued again, or dead-letter after pipeline.job_max_attempts
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db.engine import transaction
from db.schema import Job, Series, utcnow
from dicom_node.scu import wake_senders
from pipeline import jobs as J
from pipeline.compute import CHILDREN, JobLost, outcome, versions
from pipeline.compute_types import ComputeOutcome, ComputeResult, ComputeTask
from pipeline.delivery import deliver
from pipeline.discovery import rtstruct_path, series_folder
from pipeline.prompt_rois import PromptSpec

LOG = logging.getLogger("rtprop.pipeline.runner")


def task_for(factory: sessionmaker[Session], config: Config, job: Job) -> ComputeTask:
    """What the child needs: file paths, prompts, where to write, the configuration, and per structure the
    model active for its ROI name and the series' modality (pipeline/model_routing.py)."""
    from pipeline.model_routing import settings_for

    with factory() as session:
        folder = series_folder(session, job.series_instance_uid)
        rs_path = rtstruct_path(session, job.rtstruct_sop_instance_uid)
        modality = session.execute(select(Series.modality).where(
            Series.series_instance_uid == job.series_instance_uid)).scalar() or ""
    prompts = tuple(PromptSpec.from_json(p) for p in job.prompts or [])
    models = tuple((s, settings_for(factory, config, s, modality)) for s in dict.fromkeys(p.structure for p in prompts))
    out_dir = (Path(config.storage.outbox) / (job.study_instance_uid or "unknown-study")
               / f"job{job.id}" / f"attempt{job.attempts}")
    return ComputeTask(job.id, folder, job.series_instance_uid, rs_path, prompts, out_dir, config, uid_seed(job),
                       models)


def uid_seed(job: Job) -> str:
    """What a job's output UIDs are derived from: the job, its prompt RTSTRUCT and its image series, so
    every attempt of one job writes the same SOP Instance UID (the TPS gets each result once)."""
    return f"rtprop-job:{job.id}:{job.rtstruct_sop_instance_uid}:{job.series_instance_uid}"


def retry_backoff_s(config: Config, attempts: int) -> float:
    """Wait before attempt `attempts + 1` after a transient fault: doubling, capped."""
    p = config.pipeline
    return min(p.job_retry_backoff_max_s, p.job_retry_backoff_s * 2 ** max(0, attempts - 1))


def run_job(factory: sessionmaker[Session], config: Config, job: Job, me: str,
            stop: threading.Event | None = None) -> str:
    """Run a job claimed by worker `me`; returns the state it rests in."""
    p = config.pipeline
    started = time.perf_counter()
    try:
        task = task_for(factory, config, job)
    except Exception as exc:  # noqa: BLE001 - the archive lost its files: nothing to compute from
        return _failed(factory, job, me, f"{type(exc).__name__}: {exc}")
    last_beat = [time.monotonic()]

    def tick() -> bool:
        if time.monotonic() - last_beat[0] < p.heartbeat_interval_s:
            return True
        last_beat[0] = time.monotonic()
        return J.heartbeat(factory, job.id, me)

    try:
        message = _isolated(config, task, tick, stop) if p.isolate_jobs else outcome(task)
    except JobLost as exc:
        return _lost(factory, config, job, me, exc)
    if isinstance(message, ComputeResult):
        return _succeeded(factory, config, job, me, message, time.perf_counter() - started)
    kind, error = message.kind, message.error
    LOG.warning("job %s: %s (%s)", job.id, error, kind)
    if kind == "internal":
        LOG.warning("job %s traceback:\n%s", job.id, message.traceback)
    if kind == "transient":
        return _transient(factory, config, job, me, error)
    return _failed(factory, job, me, error, event="job.quarantined" if kind == "held" else "job.failed")


def _isolated(config: Config, task: ComputeTask, tick: Callable[[], bool],
              stop: threading.Event | None) -> ComputeOutcome:
    """The job in a warm compute child of this process (pipeline/compute.py), given back for the next job
    (after a lost job, its replacement is given back)."""
    p = config.pipeline
    child = CHILDREN.take(config)
    try:
        return child.run(task, p.job_timeout_s, min(1.0, p.heartbeat_interval_s), tick, stop)
    finally:
        CHILDREN.give_back(child)


def _lost(factory: sessionmaker[Session], config: Config, job: Job, me: str, exc: JobLost) -> str:
    if exc.claim_lost:
        LOG.warning("job %s: %s", job.id, exc)
        return "abandoned"
    with transaction(factory) as session:
        row = session.get(Job, job.id)
        if exc.handed_back:  # a clean stop is not the job's fault: the attempt is not counted
            J.transition(session, row, "queued", event="job.handed_back", expect_owner=me, claimed_by="",
                         attempts=max(0, row.attempts - 1))
            return "queued"
        target = "dead-letter" if row.attempts >= config.pipeline.job_max_attempts else "queued"
        event = "job.timeout" if exc.timeout else ("job.dead_letter" if target == "dead-letter" else "job.recovered")
        J.transition(session, row, target, event=event, expect_owner=me, claimed_by="",
                     error=f"attempt {row.attempts}: {exc}")
    return target


def _transient(factory: sessionmaker[Session], config: Config, job: Job, me: str, error: str) -> str:
    with transaction(factory) as session:
        row = session.get(Job, job.id)
        if row.attempts >= config.pipeline.job_max_attempts:
            J.transition(session, row, "dead-letter", expect_owner=me, claimed_by="",
                         error=f"gave up after {row.attempts} attempts; last: {error}"[:4000])
            return "dead-letter"
        delay = retry_backoff_s(config, row.attempts)
        J.transition(session, row, "queued", event="job.retry_later", expect_owner=me, claimed_by="",
                     not_before=utcnow() + timedelta(seconds=delay), details={"retry_in_s": delay},
                     error=f"attempt {row.attempts}: {error}"[:4000])
    LOG.warning("job %s: transient fault, retry in %.0f s: %s", job.id, delay, error)
    return "queued"


def _failed(factory: sessionmaker[Session], job: Job, me: str, reason: str, *, event: str = "job.failed",
            **fields: Any) -> str:
    with transaction(factory) as session:
        row = session.get(Job, job.id)
        J.transition(session, row, "failed", event=event, expect_owner=me, error=reason[:4000], **fields)
    return "failed"


def _succeeded(factory: sessionmaker[Session], config: Config, job: Job, me: str, result: ComputeResult,
               seconds: float) -> str:
    check = result.file_check
    timings = {**result.timings_s, "total_s": round(seconds, 3)}
    common = dict(backend=result.backend[:16], checkpoint_sha256=result.checkpoint_sha256,
                  versions={**versions(), "model": result.model}, timings_s=timings,
                  file_check_dice=check.min_dice, result_sop_instance_uid=result.sop_instance_uid)
    with transaction(factory) as session:
        row = session.get(Job, job.id)
        J.audit_job(session, row, "job.propagated", backend=result.backend, model=result.model,
                    structures=[s.to_json() for s in result.structures], checkpoint_sha256=result.checkpoint_sha256,
                    timings_s=timings, process={"pid": result.pid, "job_in_process": result.job_in_process})
    if not check.ok:
        held = quarantine_result(config, job, result.path, list(check.problems))
        return _failed(factory, job, me, "file check failed (the written RTSTRUCT does not match its masks): " + "; ".join(check.problems)[:3000],
                       event="job.quarantined", result_path=str(held), result_sha256=result.sha256, **common)
    with transaction(factory) as session:
        row = session.get(Job, job.id)
        # error="": an earlier attempt's fault (e.g. "attempt 1 lost") is history (in the audit), not this job's state
        J.transition(session, row, "validated", expect_owner=me, result_path=str(result.path),
                     result_sha256=result.sha256, error="", **common)
        J.audit_job(session, row, "job.file_check", dice=check.dice, ok=True)
        state = deliver(session, config, row, result.path, implausible=result.implausible)
    if state == "sending":  # committed: this process's sender delivers it now rather than at its next poll
        wake_senders()
    return state


def quarantine_result(config: Config, job: Job, path: Path, problems: list[str]) -> Path:
    """Hold a result that failed its file check: moved out of the outbox, with the reasons beside it."""
    folder = Path(config.storage.quarantine) / "jobs" / f"job{job.id}-attempt{job.attempts}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    shutil.move(str(path), target)
    (folder / f"{path.name}.reason.json").write_text(json.dumps(
        {"job_id": job.id, "reason": "file check failed", "problems": problems,
         "series_instance_uid": job.series_instance_uid, "rtstruct_sop_instance_uid": job.rtstruct_sop_instance_uid},
        indent=1))
    return target
