"""The job engine of the distributed mode (PostgreSQL): Procrastinate runs propagation jobs, sends and
batch items on any number of `rtprop worker` processes, on any machine that reaches the database and
the archive (docs/scaling.md). SQLite keeps the in-process loop of pipeline/worker.py.

Why Procrastinate (and not Celery + RabbitMQ): its queue is a table in the same PostgreSQL, so a
task is enqueued in the same transaction that moves the row (db/queue.py): no dual write and no
outbox relay; its workers keep a heartbeat row and a stalled job (its worker gone) can be retried
from SQL; no broker to run, back up or monitor.

What each part owns:
- the rows (jobs, sends) are the truth and the state machine (pipeline/jobs.py, dicom_node/scu.py);
- an engine message only says "look at row N": every task claims its row with a compare-and-set
  first, so a message delivered twice, or a message for a row already done, runs nothing;
- housekeeping (every worker process, `housekeeping_pass`) recovers rows of dead workers (job
  heartbeats, process heartbeats for sends on other hosts), re-enqueues any runnable row that has
  no message (a message lost with a crashed task), and retries messages of stalled engine workers.

Queues (db/queue.py): `cpu` (weight-free propagation), `gpu` (a backend that wants a GPU, SAM2: a process
taking this queue runs one job of it at a time, beside its other queues; a job's queue follows the models
routed to its structures, pipeline/model_routing.py), `sends` (C-STORE), `batch` (nightly items, lowest
priority).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import make_url, select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db import queue
from db.engine import log_fault, transaction
from db.heartbeat import latest
from db.schema import Job, Send
from pipeline import jobs as J

LOG = logging.getLogger("rtprop.pipeline.tasks")
_context: dict[str, Any] = {}  # this process's database and configuration, set by `run_engine_worker`


def conninfo(url: str) -> str:
    """The libpq connection string of a SQLAlchemy URL (what Procrastinate's connector takes)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def make_app(url: str):  # type: ignore[no-untyped-def]
    """A Procrastinate app on the database at `url`, with rtprop's tasks registered."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo(url), min_size=1,
                                                                     max_size=4))
    app.task(name=queue.TASK_PROPAGATE, queue="cpu")(propagate_task)
    app.task(name=queue.TASK_SEND, queue="sends")(send_task)
    app.task(name=queue.TASK_BATCH, queue="batch")(batch_task)
    return app


def _me() -> str:
    from dicom_node.scu import worker_id

    return f"{worker_id()}#t{threading.get_ident() % 100000}"


def propagate_task(job_id: int) -> str:
    """`rtprop.propagate`: claim job `job_id` if it is queued and due, run it (pipeline/runner.py)."""
    from pipeline.runner import run_job

    factory, config = _context["factory"], _context["config"]
    me = _me()
    job = J.claim(factory, job_id, me)
    if job is None:
        return "nothing to do"
    LOG.info("worker %s claimed job %s (attempt %d)", me, job.id, job.attempts)
    return run_job(factory, config, job, me)


def send_task(send_id: int) -> str:
    """`rtprop.send`: send row `send_id` if pending and due; the job follows its send at once."""
    from dicom_node.scu import deliver_one
    from pipeline.delivery import reconcile_sends

    factory, config = _context["factory"], _context["config"]
    done = deliver_one(factory, config, send_id, me=_me())
    if done is None:
        return "nothing to do"
    with factory() as session:
        job_id = session.execute(select(Send.job_id).where(Send.id == send_id)).scalar()
    if job_id is not None:
        reconcile_sends(factory, job_ids=[job_id])
    return done.state


def batch_task(run: str, study: str, since: str | None, until: str | None, roi_regex: str, send: bool,
               routes: dict[str, dict[str, Any]] | None = None) -> str:
    """`rtprop.batch_study`: re-contour one study of a distributed batch run (pipeline/batch.py)."""
    from pipeline.batch import run_study

    return run_study(_context["factory"], _context["config"], run, study, since=since, until=until,
                     roi_regex=roi_regex, send=send, routes=routes)


# --------------------------------------------------------------------------- housekeeping
def live_owner(factory: sessionmaker[Session], config: Config) -> Callable[[str], bool]:
    """Is the process of a claim (`host:pid:start[#...]`) alive? This host: its pid; another host: a
    heartbeat row of that process younger than pipeline.heartbeat_timeout_s."""
    from dicom_node.scu import owner_alive

    limit = config.pipeline.heartbeat_timeout_s
    with factory() as session:
        fresh = {row.process.split("#", 1)[0] for kind in ("worker", "node")
                 for row, age in latest(session, kind) if age <= limit}
    here = socket.gethostname()

    def alive(claimed_by: str) -> bool:
        owner = claimed_by.split("#", 1)[0]
        if not owner:
            return False
        if owner.rsplit(":", 2)[0] == here:
            return owner_alive(owner)
        return owner in fresh

    return alive


def requeue_orphans(factory: sessionmaker[Session]) -> dict[str, list[int]]:
    """Runnable rows without an engine message (a task that crashed before it could move its row, a
    clock ahead of the database's) get one; returns their ids."""
    def orphans(session: Session) -> tuple[list[Job], list[Send]]:
        have_jobs = queue.pending_for(session, queue.TASK_PROPAGATE, "job_id")
        have_sends = queue.pending_for(session, queue.TASK_SEND, "send_id")
        jobs = [j for j in session.execute(select(Job).where(Job.state == "queued")).scalars() if j.id not in have_jobs]
        sends = [s for s in session.execute(select(Send).where(Send.state == "pending")).scalars()
                 if s.id not in have_sends]
        return jobs, sends

    with factory() as session:  # a read first: most passes find nothing, and take no write lock
        if orphans(session) == ([], []):
            return {"jobs": [], "sends": []}
    with transaction(factory) as session:
        jobs, sends = orphans(session)
        for job in jobs:
            queue.defer(session, queue.TASK_PROPAGATE, job.queue or "cpu", {"job_id": job.id},
                        scheduled_at=job.not_before)
        for send in sends:
            queue.defer(session, queue.TASK_SEND, "sends", {"send_id": send.id}, scheduled_at=send.next_attempt_at)
    out = {"jobs": [j.id for j in jobs], "sends": [s.id for s in sends]}
    if jobs or sends:
        LOG.warning("re-enqueued rows that had no engine message: %s", out)
    return out


def housekeeping_pass(factory: sessionmaker[Session], config: Config) -> None:
    """One pass, safe in every worker process at once: the node's housekeeping (recovery of lost jobs,
    discovery, delivery bookkeeping), then sends of dead senders, orphaned rows, stalled messages."""
    from dicom_node.scu import recover_stale
    from pipeline.housekeeping import housekeeping

    alive = live_owner(factory, config)
    housekeeping(factory, config, owner_alive=alive)
    recover_stale(factory, me="", alive=alive)
    requeue_orphans(factory)
    with factory() as session:
        stalled = queue.stalled(session, config.pipeline.heartbeat_timeout_s)
    if stalled:
        with transaction(factory) as session:
            stalled = queue.retry_stalled(session, config.pipeline.heartbeat_timeout_s)
    if stalled:
        LOG.warning("retried %d engine message(s) of stalled workers: %s", len(stalled), stalled)


def start_housekeeping(factory: sessionmaker[Session], config: Config, stop: threading.Event) -> threading.Thread:
    """A thread running `housekeeping_pass` every pipeline.poll_interval_s until `stop`."""
    def run() -> None:
        while not stop.is_set():
            try:
                housekeeping_pass(factory, config)
            except Exception as exc:  # noqa: BLE001 - the database may be down: try again next pass
                log_fault(LOG, "housekeeping pass", exc)
            stop.wait(config.pipeline.poll_interval_s)

    thread = threading.Thread(target=run, name="rtprop-housekeeping", daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------- the worker
def worker_queues(queues: Iterable[str] | None) -> list[str]:
    """The queues a worker listens to (default: all), checked against db.queue.QUEUES."""
    chosen = list(queues or queue.QUEUES)
    unknown = [q for q in chosen if q not in queue.QUEUES]
    if unknown:
        from config.errors import UserError

        raise UserError(f"--queues: unknown queue(s) {', '.join(unknown)} (queues: {', '.join(queue.QUEUES)})")
    return chosen


def worker_groups(queues: list[str], concurrency: int) -> list[tuple[list[str], int]]:
    """(queues, jobs at once) of each engine worker a process runs: `gpu` on its own, one job at a time (a
    second SAM2 model would not fit the GPU); the other queues together, `concurrency` at once."""
    others = [q for q in queues if q != "gpu"]
    groups = [(["gpu"], 1)] if "gpu" in queues else []
    return groups + ([(others, concurrency)] if others else [])


def run_engine_worker(factory: sessionmaker[Session], config: Config, stop: threading.Event, *,
                      queues: Iterable[str] | None = None, concurrency: int = 1, name: str = "rtprop") -> None:
    """Run a Procrastinate worker in this thread until `stop` is set; restarted if it fails (database down).

    Stopping is a drain: no new message is taken, running jobs finish (docs/scaling.md).
    """
    from procrastinate.worker import Worker as EngineWorker

    groups = worker_groups(worker_queues(queues), concurrency)
    _context.update(factory=factory, config=config)
    app = make_app(config.database.url)
    p = config.pipeline

    async def main() -> None:
        async with app.open_async():
            workers = [EngineWorker(app, queues=group, name=f"{name}-{'+'.join(group)}", concurrency=n, wait=True,
                                    fetch_job_polling_interval=p.poll_interval_s, listen_notify=True,
                                    delete_jobs="successful", install_signal_handlers=False,
                                    update_heartbeat_interval=p.heartbeat_interval_s,
                                    stalled_worker_timeout=p.heartbeat_timeout_s) for group, n in groups]
            threading.Thread(target=lambda: (stop.wait(), [w.stop() for w in workers]), daemon=True).start()
            for group, n in groups:
                LOG.info("engine worker %s: queues %s, %d at a time", name, ",".join(group), n)
            await asyncio.gather(*(w.run() for w in workers))

    while not stop.is_set():
        try:
            asyncio.run(main())
        except Exception as exc:  # noqa: BLE001 - e.g. the database went away: start again
            log_fault(LOG, f"engine worker (starting again in {p.heartbeat_interval_s:.0f} s)", exc)
            stop.wait(p.heartbeat_interval_s)
