"""The job engine's queue, written in the caller's transaction (PostgreSQL only; SQLite has none).

In the distributed mode (docs/scaling.md) Procrastinate (pipeline/tasks.py) runs the jobs; its
queue lives in the same PostgreSQL database. Each move that makes work runnable (a job row to
`queued`, a send row to `pending`) calls `defer` inside the same transaction, so the row and its
task message commit together or not at all: no dual write, no outbox relay. `defer` calls
Procrastinate's own SQL function `procrastinate_defer_jobs_v1` (procrastinate==3.10.0's schema,
applied by migration 0004) on our connection, as `procrastinate.manager.JobManager.defer_job` does.

A message only says "look at row N": the rows are the truth and every task claims its row with a
compare-and-set first, so a message delivered twice (no engine runs a task exactly once) runs once.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

# Queues: weight-free propagation, SAM2 propagation (one job at a time per GPU worker), outbound
# C-STOREs, nightly batch items (lowest priority).
QUEUES = ("cpu", "gpu", "sends", "batch")
PRIORITY = {"cpu": 10, "gpu": 10, "sends": 20, "batch": 0}  # higher runs first
TASK_PROPAGATE = "rtprop.propagate"
TASK_SEND = "rtprop.send"
TASK_BATCH = "rtprop.batch_study"

_DEFER = text("SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[ROW(:queue, :task, :priority, NULL, NULL, "
              "CAST(:args AS jsonb), :scheduled_at)::procrastinate_job_to_defer_v1]))")


def enabled(session: Session) -> bool:
    """Is there an engine queue to write to (PostgreSQL), or does the in-process loop poll the rows?"""
    return session.get_bind().dialect.name == "postgresql"


def defer(session: Session, task: str, queue: str, args: dict[str, Any],
          scheduled_at: datetime | None = None) -> int | None:
    """Enqueue `task(**args)` on `queue` in the caller's transaction; returns the engine's job id
    (None on SQLite, where workers poll the rows themselves)."""
    if not enabled(session):
        return None
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r} (queues: {', '.join(QUEUES)})")
    return int(session.execute(_DEFER, {"queue": queue, "task": task, "priority": PRIORITY[queue],
                                        "args": json.dumps(args), "scheduled_at": scheduled_at}).scalar())


def pending_for(session: Session, task: str, key: str) -> set[int]:
    """Row ids (args[key]) that have a message waiting or running for `task`."""
    rows = session.execute(text("SELECT (args->>:key)::bigint FROM procrastinate_jobs WHERE task_name = :task "
                                "AND status IN ('todo', 'doing') AND args ? :key"),
                           {"key": key, "task": task}).scalars()
    return {int(r) for r in rows if r is not None}


def stalled(session: Session, seconds_since_heartbeat: float) -> list[int]:
    """Messages left `doing` by a Procrastinate worker whose heartbeat stopped (killed, host lost): the
    query of Procrastinate's `JobManager.get_stalled_jobs`."""
    return [int(i) for i in session.execute(text(
        "SELECT job.id FROM procrastinate_jobs job LEFT JOIN procrastinate_workers w ON w.id = job.worker_id "
        "WHERE job.status = 'doing' AND (job.worker_id IS NULL OR "
        "w.last_heartbeat < NOW() - make_interval(secs => :s))"), {"s": seconds_since_heartbeat}).scalars()]


def retry_stalled(session: Session, seconds_since_heartbeat: float) -> list[int]:
    """Stalled messages go back to `todo` (Procrastinate's own retry function, as `retry_job` calls it);
    their tasks then find their rows recovered or done. Returns their ids."""
    ids = stalled(session, seconds_since_heartbeat)
    for job_id in ids:
        session.execute(text("SELECT procrastinate_retry_job_v2(:id, NOW(), NULL, NULL, NULL)"), {"id": job_id})
    return [int(i) for i in ids]
