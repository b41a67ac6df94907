"""Discovery: which jobs the database calls for, and when a received job can run.

Jobs are created from database state only: an RTSTRUCT instance whose own series is complete gets
exactly one job (state `received`), created by the receiving node in the transaction that completes
that series (`jobs_on_completion`, dicom_node/completion.py), with the route its routes give the
calling AE (dicom_node/routing.py `route_for_job`); a housekeeping pass creates any that is missing
(`create_jobs`). Each pass then decides every `received` job:
  - an RTSTRUCT written by rtprop itself (a result the TPS sent back) -> `ignored`, at once;
  - its image series found (`match_series`) and complete, prompts found (pipeline/prompt_rois.py)
    -> `queued`; no prompt or an unusable series -> `failed` with the reason;
  - the series ambiguous -> `failed` at once, naming the candidates (never a guess);
  - the series absent or still receiving -> stays `received`; what it waits for is written to the
    job (`waiting_for`), the log and the audit (`job.waiting`) as soon as it starts waiting, and the
    job fails cleanly after `pipeline.series_wait_s`.
Each decision is read in a short read, worked out with no database session open, and written in
one transaction of its own: no pass ever holds the write lock while it reads files or while
another transaction of the same thread waits for it (db/engine.py).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import CTImageStorage, MRImageStorage, RTStructureSetStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.errors import UserError
from config.schema import Config
from converters.errors import ConversionError
from converters.rtstruct_write import MANUFACTURER
from db.engine import transaction
from db.schema import Instance, Job, Series, aware, utcnow
from dicom_node.completion import RULES
from dicom_node.routing import route_for_job
from pipeline.jobs import JobStateError, audit_job, create_job, transition, wake_workers_after_commit
from pipeline.prompt_rois import PromptSpec, find_prompts

LOG = logging.getLogger("rtprop.pipeline.discovery")
MODALITY_OF_CLASS = {CTImageStorage: "CT", MRImageStorage: "MR"}


class DiscoveryError(UserError):
    """An RTSTRUCT that cannot become a job (no prompt, no usable series); the message says why."""


def _header(path: str | Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def is_own_result(ds: pydicom.Dataset) -> bool:
    """An RTSTRUCT written by rtprop (a result sent back by the TPS or PACS): never a prompt."""
    return str(ds.get("Manufacturer", "")).strip().lower() == MANUFACTURER.lower()


def create_jobs_for_series(session: Session, config: Config, series_uid: str | None = None) -> list[int]:
    """One `received` job per prompt RTSTRUCT instance of a complete series (of `series_uid`, or of any) that
    has none yet, inside the caller's write transaction; each job's route is decided now from `config`'s
    routes (the node's that completed the series, which received it)."""
    stmt = (select(Instance.sop_instance_uid, Instance.study_instance_uid, Instance.calling_ae,
                   Instance.patient_id_hash)
            .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
            .where(Instance.sop_class_uid == RTStructureSetStorage, Series.state == "complete",
                   Instance.sop_instance_uid.not_in(select(Job.rtstruct_sop_instance_uid).where(Job.kind == "prompt")))
            .order_by(Instance.id))
    if series_uid is not None:
        stmt = stmt.where(Instance.series_instance_uid == series_uid)
    created = []
    for sop_uid, study_uid, calling_ae, patient in session.execute(stmt).all():
        job, new = create_job(session, rtstruct_uid=sop_uid, study_uid=study_uid, calling_ae=calling_ae or "",
                              patient_id_hash=patient, route=route_for_job(config, calling_ae or ""))
        if new:
            created.append(job.id)
    return created


def jobs_on_completion(config: Config) -> Callable[[Session, Series], list[int]]:
    """The series-completion hook of a receiving node (dicom_node/completion.py): a completed series' prompt
    RTSTRUCTs get their jobs in the transaction that closes it, routed by this node's routes."""
    def hook(session: Session, series: Series) -> list[int]:
        created = create_jobs_for_series(session, config, series.series_instance_uid)
        if created:  # this process's workers decide them as soon as they can see them
            wake_workers_after_commit(session)
        return created

    return hook


def create_jobs(factory: sessionmaker[Session], config: Config) -> list[int]:
    """Catch-up: jobs for complete series that have none (a series closed without the hook, e.g. before an
    upgrade); a receiving node creates them as it completes each series."""
    with factory() as session:
        pending = session.execute(
            select(Instance.id).join(Series, Series.series_instance_uid == Instance.series_instance_uid)
            .where(Instance.sop_class_uid == RTStructureSetStorage, Series.state == "complete",
                   Instance.sop_instance_uid.not_in(select(Job.rtstruct_sop_instance_uid).where(Job.kind == "prompt")))
            .limit(1)).scalar()
    if pending is None:  # a read first: most passes find nothing, and take no write lock
        return []
    with transaction(factory) as session:
        return create_jobs_for_series(session, config)


# --------------------------------------------------------------------------- which series
@dataclass
class SeriesMatch:
    """The image series of an RTSTRUCT: `series` found, or None with `reason`; `ambiguous` = refuse."""

    series: Series | None
    reason: str = ""
    ambiguous: bool = False
    how: str = ""


def referenced_images(rtstruct: pydicom.Dataset) -> tuple[set[str], set[str], set[str]]:
    """(SOP Instance UIDs, SOP Class UIDs, Series Instance UIDs) of the images the RTSTRUCT references."""
    instances: set[str] = set()
    classes: set[str] = set()
    items = [img for rc in rtstruct.get("ROIContourSequence", []) for c in rc.get("ContourSequence", [])
             for img in c.get("ContourImageSequence", [])]
    series: set[str] = set()
    for f in rtstruct.get("ReferencedFrameOfReferenceSequence", []):
        for st in f.get("RTReferencedStudySequence", []):
            for se in st.get("RTReferencedSeriesSequence", []):
                series.add(str(se.get("SeriesInstanceUID", "")))
                items.extend(se.get("ContourImageSequence", []))
    for item in items:
        instances.add(str(item.get("ReferencedSOPInstanceUID", "")))
        classes.add(str(item.get("ReferencedSOPClassUID", "")))
    return instances - {""}, classes - {""}, series - {""}


def _describe(series: list[Series]) -> str:
    return ", ".join(f"{s.series_instance_uid} ({s.modality or '?'}, {s.instance_count} instances)" for s in series)


def match_series(session: Session, rtstruct: pydicom.Dataset, study_uid: str) -> SeriesMatch:
    """The image series an RTSTRUCT is drawn on, by the one rule the node, the drop-in and the batch share.

    1. the series holding the image instances its contours reference (SOP Instance UIDs);
    2. else the series named in RTReferencedSeriesSequence;
    3. else the one series of the study in its Frame of Reference whose modality fits the referenced
       SOP Classes (CT Image Storage -> CT, MR Image Storage -> MR; any image modality if none).
    More than one candidate is an error naming them (a CT and a registered MR share a Frame of
    Reference); no candidate means not (yet) received.
    """
    instance_uids, class_uids, series_uids = referenced_images(rtstruct)
    if instance_uids:
        held = Counter(session.execute(select(Instance.series_instance_uid).where(
            Instance.sop_instance_uid.in_(instance_uids), Instance.sop_class_uid != RTStructureSetStorage)).scalars())
        if held:
            found = session.execute(select(Series).where(Series.series_instance_uid.in_(held))).scalars().all()
            if len(found) == 1:
                return SeriesMatch(found[0], how="referenced instances")
            return SeriesMatch(None, f"ambiguous: the referenced images are in {len(found)} series: {_describe(found)}",
                               ambiguous=True)
    for uid in sorted(series_uids):
        s = session.execute(select(Series).where(Series.series_instance_uid == uid)).scalar()
        if s is not None and s.modality != "RTSTRUCT":
            return SeriesMatch(s, how="referenced series")
    frames = {str(f.get("FrameOfReferenceUID", "")) for f in rtstruct.get("ReferencedFrameOfReferenceSequence", [])}
    frames |= {str(r.get("ReferencedFrameOfReferenceUID", "")) for r in rtstruct.get("StructureSetROISequence", [])}
    frames.discard("")
    modalities = {MODALITY_OF_CLASS[c] for c in class_uids if c in MODALITY_OF_CLASS}
    candidates = []
    for s in session.execute(select(Series).where(Series.study_instance_uid == study_uid,
                                                  Series.modality != "RTSTRUCT")).scalars().all():
        if modalities and s.modality not in modalities:
            continue
        path = session.execute(select(Instance.path).where(Instance.series_instance_uid == s.series_instance_uid)
                               .limit(1)).scalar()
        try:
            if path and str(_header(path).get("FrameOfReferenceUID", "")) in frames:
                candidates.append(s)
        except Exception as exc:  # noqa: BLE001 - an unreadable archived file is not this series
            LOG.warning("cannot read %s: %s", path, exc)
    wanted = f"Frame of Reference {sorted(frames)}" + (f", modality {sorted(modalities)}" if modalities else "")
    if len(candidates) == 1:
        return SeriesMatch(candidates[0], how=f"{wanted}")
    if candidates:
        return SeriesMatch(None, f"ambiguous: {len(candidates)} image series in {wanted}, none referenced by its "
                                 f"instances: {_describe(candidates)}", ambiguous=True)
    named = f"series {sorted(series_uids)} or " if series_uids else ""
    return SeriesMatch(None, f"image {named}a series in {wanted}")


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


# --------------------------------------------------------------------------- deciding a received job
@dataclass
class Decision:
    """What to do with one `received` job: state queued | failed | ignored, or None = keep waiting."""

    state: str | None
    reason: str = ""
    event: str | None = None
    series_uid: str = ""
    specs: list[PromptSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    queue: str = "cpu"  # the job engine's queue of the models routed to its structures
    completed_by: str = ""  # the rule that closed the image series (dicom_node/completion.py RULES)


def decide(factory: sessionmaker[Session], config: Config, job_id: int, now: datetime) -> Decision:
    """Work out what a received job needs; reads only (short read sessions, files read outside them)."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    with factory() as session:
        job = session.get(Job, job_id)
        waited = (now - (aware(job.waiting_since or job.created_at) or now)).total_seconds()
        try:
            path = rtstruct_path(session, job.rtstruct_sop_instance_uid)
            ds = _header(path)
            if str(ds.get("SOPInstanceUID", "")) != job.rtstruct_sop_instance_uid:
                raise DiscoveryError(f"{path} no longer holds SOP Instance {job.rtstruct_sop_instance_uid} "
                                     "(damaged on disk?)")
        except Exception as exc:  # noqa: BLE001 - unreadable on disk: the job cannot be run
            return Decision("failed", f"prompt RTSTRUCT unreadable: {type(exc).__name__}: {exc}")
        if is_own_result(ds):
            return Decision("ignored", "RTSTRUCT written by rtprop itself (a result sent back to the node): "
                                       "never a prompt", event="job.ignored")
        match = match_series(session, ds, job.study_instance_uid)
        if match.ambiguous:
            return Decision("failed", f"cannot tell which image series the prompt is drawn on: {match.reason}")
        wait_s = config.pipeline.series_wait_s
        if match.series is None:
            if waited > wait_s:
                return Decision("failed", f"no image series after {waited:.0f} s (pipeline.series_wait_s="
                                          f"{wait_s:g}): waited for {match.reason}")
            return Decision(None, f"waiting for {match.reason} (fails after pipeline.series_wait_s={wait_s:g} s)")
        s = match.series
        if s.state == "receiving":
            limit = wait_s + config.node.series_gap_timeout_s
            if waited > limit:
                return Decision("failed", f"image series {s.series_instance_uid} still receiving after {waited:.0f} s")
            return Decision(None, f"waiting for image series {s.series_instance_uid} ({s.modality}) to complete: "
                                  + _completion_hint(ds, s.series_instance_uid, config))
        if s.state != "complete":
            return Decision("failed", f"image series {s.series_instance_uid} is {s.state}: {s.reason}",
                            series_uid=s.series_instance_uid)
        series_uid, completed_by = s.series_instance_uid, s.completed_by
        try:
            folder = series_folder(session, series_uid)
        except DiscoveryError as exc:
            return Decision("failed", str(exc), series_uid=series_uid)
    try:  # headers only: the prompts are found on the geometry; the job reads the pixels once, when it runs
        volume = read_series(folder, series_uid, pixels=False)
        structure_set = read_rtstruct(path, volume)
        specs, notes = find_prompts(structure_set, volume, config.pipeline)
    except (ConversionError, UserError, OSError) as exc:
        return Decision("failed", f"{type(exc).__name__}: {exc}", series_uid=series_uid)
    if not specs:
        p = config.pipeline
        return Decision("failed", "no prompt ROI found (single-slice ROI, POINT ROI named with "
                                  f"{p.positive_point_marker!r}/{p.negative_point_marker!r}, or recontour_roi_regex "
                                  "match): " + "; ".join(notes)[:1500], event="job.no_prompt", series_uid=series_uid)
    from pipeline.model_routing import job_queue

    with factory() as session:
        queue = job_queue(session, config, [s.structure for s in specs], series_uid)
    return Decision("queued", series_uid=series_uid, specs=specs, notes=notes, queue=queue,
                    completed_by=completed_by)


def _completion_hint(rtstruct: pydicom.Dataset, series_uid: str, config: Config) -> str:
    """Which rule will complete the series this prompt waits for (dicom_node/completion.py), in words."""
    from converters.rtstruct_read import image_listings

    listing = image_listings(rtstruct).get(series_uid)
    if listing is not None and listing.whole_series:
        return f"the prompt lists all {len(listing.listed)} of its images; complete at once when every one is here"
    node = config.node
    what = "lists only its contoured slices" if listing is not None else "lists no images of it"
    release = " or at its association's release (node.complete_on_release)" if node.complete_on_release else ""
    return (f"the prompt {what}, so the series completes after node.series_quiet_period_s="
            f"{node.series_quiet_period_s:g} s without a new image{release}")


def apply(factory: sessionmaker[Session], job_id: int, decision: Decision) -> str:
    """Write one decision in its own transaction; returns the job's state afterwards."""
    if decision.state is None:  # still waiting: a read first, no write lock when nothing changed
        with factory() as session:
            job = session.get(Job, job_id)
            if job.state != "received" or job.waiting_for == decision.reason:
                return job.state
    with transaction(factory) as session:
        job = session.get(Job, job_id)
        if job.state != "received":
            return job.state  # another process decided first
        if decision.state is None:
            if job.waiting_for != decision.reason:
                job.waiting_for = decision.reason
                audit_job(session, job, "job.waiting", waiting_for=decision.reason)
                LOG.info("job %s %s", job_id, decision.reason)
            return "received"
        fields: dict[str, Any] = {}
        if decision.series_uid:
            fields["series_instance_uid"] = decision.series_uid
        try:
            if decision.state == "queued":
                rule = {"series_completed_by": decision.completed_by,
                        "series_rule": RULES.get(decision.completed_by, "")} if decision.completed_by else {}
                transition(session, job, "queued", prompts=[s.to_json() for s in decision.specs], details=rule,
                           queue=decision.queue, **fields)
                audit_job(session, job, "job.prompts", notes=decision.notes[:20], prompts=[
                    {"structure": s.structure, "prompt": s.describe(), "slices": s.slices, "mode": s.mode}
                    for s in decision.specs])
            else:
                transition(session, job, decision.state, event=decision.event, error=decision.reason, **fields)
        except JobStateError as exc:  # moved by another process in between
            LOG.info("%s", exc)
            return job.state
    log = LOG.info if decision.state in ("queued", "ignored") else LOG.warning
    log("job %s %s%s", job_id, decision.state, f": {decision.reason}" if decision.reason else "")
    return decision.state


def resolve_received(factory: sessionmaker[Session], config: Config, now: datetime | None = None) -> dict[int, str]:
    """Move `received` jobs on (queued, failed, ignored) or record what they wait for."""
    now = now or utcnow()
    with factory() as session:
        ids = session.execute(select(Job.id).where(Job.state == "received", Job.kind == "prompt")
                              .order_by(Job.id)).scalars().all()
    changed: dict[int, str] = {}
    for job_id in ids:
        try:
            decision = decide(factory, config, job_id, now)
        except Exception as exc:  # noqa: BLE001 - an unforeseen fault ends this job, with its reason
            LOG.exception("job %s: deciding failed", job_id)
            decision = Decision("failed", f"internal error while reading the prompt: {type(exc).__name__}: {exc}")
        state = apply(factory, job_id, decision)
        if state != "received":
            changed[job_id] = state
    return changed


def discover(factory: sessionmaker[Session], config: Config) -> dict[str, Any]:
    """One pass: create jobs for new prompt RTSTRUCTs, then move received jobs on."""
    created = create_jobs(factory, config)
    changed = resolve_received(factory, config)
    return {"created": created, "changed": changed}
