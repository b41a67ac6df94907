"""Workers: the loop that keeps jobs moving. What each step does lives in a module of its own:

  pipeline/housekeeping.py  recovery of lost jobs, discovery, delivery bookkeeping (worker 0 only)
  pipeline/runner.py        running one claimed job (pipeline/compute.py in the thread's warm child process)
  pipeline/delivery.py      validated -> sending / sent (outbound queue, drop-in outbox)

A worker loop (`Worker.run`) does, every `pipeline.poll_interval_s`: housekeeping (worker 0),
then claims the oldest due queued job and runs it. A killed worker leaves nothing running; its job
is recovered by the next worker and its result is queued for sending once, by whichever attempt
finishes (the `sends` row is written in the same transaction as validated -> sending).
"""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db.schema import Job
from pipeline import jobs as J
from pipeline.compute import CHILDREN, ComputeChild
from pipeline.housekeeping import housekeeping
from pipeline.runner import run_job

LOG = logging.getLogger("rtprop.pipeline.worker")


def worker_identity(index: int = 0) -> str:
    from dicom_node.scu import worker_id

    return f"{worker_id()}#w{index}"


class Worker:
    """One worker: housekeeping (index 0) and job execution. Restart-safe. Idle, it looks again every
    pipeline.poll_interval_s, or at once when pipeline/jobs.py `wake_workers` is called (prompts' series completed)."""

    def __init__(self, factory: sessionmaker[Session], config: Config, index: int = 0) -> None:
        self.factory = factory
        self.config = config
        self.index = index
        self.me = worker_identity(index)
        self.stop: threading.Event | None = None  # set by run(): a clean stop hands the running job back
        self.wake = J.wake_event()

    def housekeeping(self) -> None:
        housekeeping(self.factory, self.config)

    def run_once(self) -> int | None:
        """Claim and run one due queued job; returns its id, or None when none is due."""
        job = J.claim_next(self.factory, self.me)
        if job is None:
            return None
        LOG.info("worker %s claimed job %s (attempt %d)", self.me, job.id, job.attempts)
        run_job(self.factory, self.config, job, self.me, self.stop)
        return job.id

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set; every error is logged and the loop goes on. A compute child is started first,
        so its imports are done before a job arrives; the idle children are closed when the loop ends."""
        self.stop = stop
        if self.config.pipeline.isolate_jobs:  # this thread's compute child, importing before the first job comes
            CHILDREN.give_back(ComputeChild(self.config).start())
        try:
            while not stop.is_set():
                busy = False
                try:
                    if self.index == 0:
                        self.housekeeping()
                    busy = self.run_once() is not None
                except Exception:
                    LOG.exception("worker %s pass failed; retrying", self.me)
                if not busy:
                    self.wake.wait(self.config.pipeline.poll_interval_s)
                    self.wake.clear()
        finally:
            CHILDREN.close()  # the children this loop started would die with its thread anyway

    def drain(self, timeout_s: float = 600) -> None:
        """Run until no job is received, queued or running (tests, `rtprop worker --once`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.housekeeping()
            if self.run_once() is not None:
                continue
            with self.factory() as session:
                pending = session.execute(select(Job.id).where(Job.state.in_(("queued", "running")))
                                          .limit(1)).scalar()
                waiting = session.execute(select(Job.id).where(Job.state == "received", Job.waiting_for == "")
                                          .limit(1)).scalar()
            if pending is None and waiting is None:
                self.housekeeping()
                return
            time.sleep(self.config.pipeline.poll_interval_s)
        raise TimeoutError(f"jobs still pending after {timeout_s:.0f} s")


def start_workers(factory: sessionmaker[Session], config: Config, stop: threading.Event,
                  count: int | None = None) -> list[threading.Thread]:
    """`count` worker threads (each runs its jobs in child processes); index 0 also does housekeeping."""
    threads = []
    for i in range(config.pipeline.workers if count is None else count):
        w = Worker(factory, config, i)
        t = threading.Thread(target=w.run, args=(stop,), name=f"rtprop-worker-{i}", daemon=True)
        t.start()
        threads.append(t)
    return threads
