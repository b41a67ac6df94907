"""Housekeeping, every worker pass (idempotent, safe in several processes at once).

1. recovery: jobs left `running` by a dead worker -> queued (or dead-letter), pipeline/jobs.py;
2. discovery: new prompt RTSTRUCTs -> jobs, received -> queued / failed / ignored, pipeline/discovery.py;
3. delivery bookkeeping: `sending` jobs follow their send rows; failed drop-in cases get their
   failure marker, pipeline/delivery.py.
"""
from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from pipeline import jobs as J
from pipeline.delivery import reconcile_sends, report_dropin_failures
from pipeline.discovery import discover


def owner_alive(claimed_by: str) -> bool:
    """Is the worker process named in a claim (`host:pid:start#wN`) still running?"""
    from dicom_node.scu import owner_alive as process_alive

    return process_alive(claimed_by.split("#", 1)[0])


def housekeeping(factory: sessionmaker[Session], config: Config,
                 owner_alive: Callable[[str], bool] = owner_alive) -> None:
    """One pass of recovery, discovery and delivery bookkeeping (`owner_alive`: is a claim's process there)."""
    p = config.pipeline
    J.recover_stale(factory, heartbeat_timeout_s=p.heartbeat_timeout_s, max_attempts=p.job_max_attempts,
                    owner_alive=owner_alive)
    discover(factory, config)
    reconcile_sends(factory)
    report_dropin_failures(factory, config)
