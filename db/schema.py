"""The database tables. The database is the spine: every hand-over between stages is a row.

Changing a table means a new Alembic revision in db/migrations/versions (never edit a released one).
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they are UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """One received DICOM instance, recorded before the C-STORE success status is returned."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    patient_id_hash: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    source: Mapped[str] = mapped_column(String(16), default="dimse")  # dimse | dropin | import
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    receipt: Mapped[str] = mapped_column(String(32), default="", index=True)  # receipts.id ('' before 0008_receipts)


class Receipt(Base):
    """What one association (or drop-in case, or re-ingest) stored: its instance rows carry its id, and
    the audit records it once, when it ends (`instances.received` per series: count and digest of its
    instances' SOP Instance UIDs and SHA-256), or at the next start when a crash cut it (db/receipts.py)."""

    __tablename__ = "receipts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    received_by: Mapped[str] = mapped_column(String(128), default="")  # host:pid:start of the receiving process
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    source: Mapped[str] = mapped_column(String(16), default="dimse")
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    how: Mapped[str] = mapped_column(String(16), default="")  # released | aborted | done | recovered
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class Series(Base):
    """A series as it arrives: `receiving`, then `complete` (quiet and contiguous) or `failed` (a gap past
    node.series_gap_timeout_s, or a stack the reader refuses); a late instance reopens it (dicom_node/completion.py)."""

    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    patient_id_hash: Mapped[str] = mapped_column(String(64), default="")
    completed_by: Mapped[str] = mapped_column(String(16), default="")  # the rule that closed it (COMPLETION_RULES)


class Job(Base):
    """One propagation job; its states and moves are in pipeline/jobs.py (received -> queued -> running ->
    validated -> sending -> sent, or failed | dead-letter | ignored)."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    kind: Mapped[str] = mapped_column(String(16), default="prompt")  # prompt | recontour | batch
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    rtstruct_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    dry_run: Mapped[bool] = mapped_column(default=False)
    prompts: Mapped[list | None] = mapped_column(JSON, nullable=True)
    backend: Mapped[str] = mapped_column(String(16), default="")
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), default="")
    versions: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    timings_s: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result_path: Mapped[str] = mapped_column(Text, default="")
    result_sha256: Mapped[str] = mapped_column(String(64), default="")
    # the written RTSTRUCT read back against its masks (pipeline/file_check.py): the file, not the contour
    file_check_dice: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str] = mapped_column(String(64), default="")
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    patient_id_hash: Mapped[str] = mapped_column(String(64), default="", index=True)
    dropin_case: Mapped[str] = mapped_column(Text, default="")  # the drop-in case the prompt came in, if any
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # retry backoff
    waiting_for: Mapped[str] = mapped_column(Text, default="")  # what a received job waits for (shown, audited)
    waiting_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # where the result goes, decided from the receiving node's routes when the job was created
    # (dicom_node.routing.JobRoute as JSON; None: a job from before revision 0006_job_routes, routed at delivery)
    route: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    queue: Mapped[str] = mapped_column(String(16), default="cpu", server_default="cpu")  # the engine's: cpu | gpu
    result_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="", server_default="")


class Send(Base):
    """One file to deliver to one destination; done only when the peer answered 0x0000."""

    __tablename__ = "sends"
    __table_args__ = (Index("ix_sends_due", "state", "next_attempt_at"),
                      Index("uq_sends_job_destination", "job_id", "destination_ae", "destination_host",
                            "destination_port", unique=True))  # a job's result goes once to each destination
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    destination_ae: Mapped[str] = mapped_column(String(16))
    destination_host: Mapped[str] = mapped_column(String(255))
    destination_port: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending|sending|sent|dead-letter
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    claimed_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    patient_id_hash: Mapped[str] = mapped_column(String(64), default="")
    outcome: Mapped[str] = mapped_column(Text, default="")  # "sent", "sent with warning 0x0107 ...", "failed ..."


class AuditEntry(Base):
    """Append-only, hash-chained: each row's hash covers its content and the previous row's hash."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[str] = mapped_column(String(32))  # ISO-8601 UTC, kept as text so the hash is stable
    event: Mapped[str] = mapped_column(String(64), index=True)
    component: Mapped[str] = mapped_column(String(32), default="")
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="", index=True)
    patient_id_hash: Mapped[str] = mapped_column(String(64), default="", index=True)
    details: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON text
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


# ---------------------------------------------------------------- web app (revision 0003_web)
class User(Base):
    """A person who logs in to the web app; role viewer < reviewer < admin. Never deleted, only disabled."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="viewer")  # viewer | reviewer | admin
    password_hash: Mapped[str] = mapped_column(Text, default="")  # argon2id encoded string
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ApiToken(Base):
    """An API token for scripts: only its SHA-256 is stored; the token is shown once when made."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked: Mapped[bool] = mapped_column(default=False)


class WebSession(Base):
    """A login to the web app (revision 0007_web_sessions). The cookie carries a random id, only its SHA-256 is kept,
    so the server can end a session (logout, `users disable`, a new password); web/sessions.py also ends it
    after web.session_idle_timeout_s unused or web.session_max_age_s in all."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    client: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    end_reason: Mapped[str] = mapped_column(String(16), default="")  # logout | disabled | password


class SiteSetting(Base):
    """A fact about this site the database must remember (revision 0007_web_sessions), e.g. the SHA-256 of the
    pseudonym key, whose secret itself stays outside the database."""

    __tablename__ = "site_settings"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Heartbeat(Base):
    """One row per running process (node, worker, web): refreshed every web.heartbeat_interval_s."""

    __tablename__ = "heartbeats"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    process: Mapped[str] = mapped_column(String(128), unique=True)  # host:pid:start (dicom_node.scu.worker_id)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # node | worker | web
    details: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # e.g. AE title, host, port, workers
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Review(Base):
    """A reviewer's decision on one ROI of a job's result (also in the audit, event job.review)."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    roi: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))  # accept | reject
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)  # edit effort 1 (none) .. 5 (redo)
    comment: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
class Revision(Base):
    """One revision of a job's result made by a reviewer (pipeline/revisions.py; revision 0, the job's own
    result, has no row): a correction on one ROI or an undo, the ROI's corrections then in force, its mask
    (NPZ) and the RTSTRUCT of every ROI at this revision (revision 0009_revisions)."""

    __tablename__ = "revisions"
    __table_args__ = (UniqueConstraint("job_id", "number", name="uq_revisions_job_number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per job; only grows (an undo is a new revision)
    roi: Mapped[str] = mapped_column(String(64))  # the ROI name in the RTSTRUCT
    action: Mapped[str] = mapped_column(String(16))  # correction | undo
    correction: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # as the reviewer gave it (API form)
    corrections: Mapped[list] = mapped_column(JSON)  # the ROI's corrections in force after this revision
    previous: Mapped[int] = mapped_column(Integer)  # the revision an undo from here goes back to (-1: none)
    restores: Mapped[int | None] = mapped_column(Integer, nullable=True)  # undo: the revision whose state it restores
    mask_path: Mapped[str] = mapped_column(Text)  # NPZ of the ROI's mask and confidence ('' = the job's result)
    rtstruct_path: Mapped[str] = mapped_column(Text)
    rtstruct_sha256: Mapped[str] = mapped_column(String(64))
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # slices, confidence, warnings, seconds
    user: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Model(Base):
    """A propagation model in the registry: a registered checkpoint (or the built-in `classic`) and where it is active.

    state: registered -> active (for ROIs matching `roi_regex`, '' = all, and `modality`, '' = any)
    -> registered (superseded) | retired. `sha256` is the checkpoint's at registration: a file that
    differs at load time is refused. `evaluation` holds the last `rtprop models evaluate` result.
    """

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    backend: Mapped[str] = mapped_column(String(16))  # a backend registered in models/backends.py
    path: Mapped[str] = mapped_column(Text, default="")  # checkpoint under storage (models.folder)
    sha256: Mapped[str] = mapped_column(String(64), default="", index=True)
    model_cfg: Mapped[str] = mapped_column(String(255), default="")
    image_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    card: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="registered", index=True)
    roi_regex: Mapped[str] = mapped_column(String(255), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    evaluation: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    evaluated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    added_by: Mapped[str] = mapped_column(String(64), default="")
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    activated_by: Mapped[str] = mapped_column(String(64), default="")
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
