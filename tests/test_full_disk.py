"""A full disk, for real (a small tmpfs filled to ENOSPC): refusals are still audited, a job that hit
it is retried once there is room again, and a person can retry a failed job (issue 10, defects 6 and 8)."""
from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import sys

import pytest

from node_helpers import NodeProcess, fill_disk, make_ct_series, small_disk, storescu

RTPROP = [sys.executable, "-m", "cli"]


def _config(root, outbox=None, **pipeline):
    from config.load import load_config, resolve_storage

    return resolve_storage(load_config(None, environ={}, overrides={
        "storage": {"root": str(root), "fsync": False, "min_free_mb": 0, "outbox": str(outbox or "outbox")},
        "node": {"series_quiet_period_s": 0},
        "pipeline": {"isolate_jobs": False, "dry_run_aes": ["TPS"], "job_retry_backoff_s": 0, **pipeline}}))


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")
def test_refusals_are_audited_on_a_full_disk(tmp_path):
    with small_disk(tmp_path / "disk", 48) as disk:
        node = NodeProcess(disk / "node", config={"storage": {"fsync": False, "min_free_mb": 0},
                                                  "node": {"poll_interval_s": 0.2}})
        with node:
            fill = fill_disk(disk)
            files = make_ct_series(tmp_path / "ct", 1)
            done = storescu(node.port, files, check=False)
            refused = node.query("SELECT sop_instance_uid, details FROM audit WHERE event IN "
                                 "('instance.refused', 'instance.quarantined')")
            stored = node.query("SELECT count(*) FROM instances")[0][0]
            shutil.rmtree(fill)
        log = node.log()
    assert done.returncode != 0 and stored == 0  # storescu was told the store failed; nothing acknowledged
    assert len(refused) == 1, log[-3000:]  # the refusal is in the audit although the disk was full
    assert {json.loads(d)["status"] for _, d in refused} == {"0xA700"}
    assert "Traceback" not in log


def test_a_job_that_hits_a_full_disk_is_retried_when_there_is_room(tmp_path):
    from sqlalchemy import select

    from db.engine import open_database
    from db.schema import AuditEntry, Job
    from dicom_node.completion import CompletionChecker
    from dicom_node.storage import Received, Store
    from pipeline.worker import Worker
    from pipeline_helpers import synthetic_case

    synthetic_case(tmp_path / "case", seed=7)
    with small_disk(tmp_path / "disk", 16) as disk:  # the results' disk fills up; the database's does not
        config = _config(tmp_path / "storage", outbox=disk / "outbox")
        factory = open_database(config.storage.database)
        store = Store(config.storage, factory, fsync=False)
        for path in sorted((tmp_path / "case").iterdir()):
            assert store.ingest(path.read_bytes(), Received(calling_ae="TPS")).status == 0
        CompletionChecker(factory, config).check()
        worker = Worker(factory, config)
        worker.housekeeping()
        fill = fill_disk(disk)
        assert worker.run_once() is not None  # the result cannot be written: ENOSPC
        with factory() as session:
            job = session.execute(select(Job)).scalar_one()
        assert job.state == "queued" and "No space left" in job.error and job.not_before is not None
        shutil.rmtree(fill)
        worker.run_once()
        with factory() as session:
            job = session.get(Job, job.id)
            events = [e for (e,) in session.execute(select(AuditEntry.event).where(AuditEntry.job_id == job.id))]
    assert job.state == "validated" and job.result_sha256  # dry run: processed, not sent
    assert "job.retry_later" in events and events.count("job.claimed") == 2


def test_a_person_retries_a_failed_job_and_the_audit_names_them(tmp_path):
    from db.engine import open_database, transaction
    from db.schema import Job
    from pipeline import jobs as J

    config = _config(tmp_path / "storage")
    factory = open_database(config.storage.database)
    with transaction(factory) as session:
        job, _ = J.create_job(session, rtstruct_uid="1.2.3.4", study_uid="1.2.3", calling_ae="TPS")
        J.transition(session, job, "failed", error="image series 1.2.3.9 is failed: 1 slice(s) missing")
    run = subprocess.run(RTPROP + ["jobs", "retry", str(job.id), "--storage", str(tmp_path / "storage"),
                                   "--reason", "missing slice re-sent"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with factory() as session:
        row = session.get(Job, job.id)
    assert row.state == "received" and row.error == ""  # no prompts yet: discovery looks at its series again
    export = subprocess.run(RTPROP + ["audit", "export", "--storage", str(tmp_path / "storage"), "--event",
                                      "job.retried"], capture_output=True, text=True)
    details = json.loads(json.loads(export.stdout.splitlines()[-1])["details"])
    assert details["user"] == getpass.getuser() and details["reason"] == "missing slice re-sent"
    again = subprocess.run(RTPROP + ["jobs", "retry", str(job.id), "--storage", str(tmp_path / "storage")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "only failed or dead-letter" in again.stderr
