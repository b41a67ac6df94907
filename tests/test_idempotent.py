"""Results stay idempotent however often the job engine runs a task (it delivers at least once): a job
writes the same SOP Instance UID every time, its result is queued once per destination, and on
PostgreSQL the engine's message commits (or rolls back) with the row that makes the work runnable."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from config.schema import Destination
from db import queue
from db.engine import open_database, transaction
from db.schema import Job, Send, utcnow
from dicom_node.scu import enqueue
from node_helpers import make_ct_slice
from pipeline import jobs as J

TPS = Destination(ae_title="TPS", host="127.0.0.1", port=104)


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request, tmp_path: Path):  # type: ignore[no-untyped-def]
    location = tmp_path / "rtprop.sqlite" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    made = open_database(location, head_path=tmp_path / "head")
    yield made
    made.kw["bind"].dispose()


def _result_file(tmp_path: Path) -> Path:
    path = tmp_path / "RS_result.dcm"
    make_ct_slice("1.2.3", "1.2.3.4", 0).save_as(path, enforce_file_format=True)
    return path


def _job(session, state: str) -> Job:  # type: ignore[no-untyped-def]
    """A job of series 1.2.3.4 in `state`, with its id."""
    job = Job(series_instance_uid="1.2.3.4", state=state, created_at=utcnow(), updated_at=utcnow())
    session.add(job)
    session.flush()
    return job


def _messages(session, task: str) -> list[tuple]:  # type: ignore[no-untyped-def]
    if not queue.enabled(session):
        return []
    return list(session.execute(text("SELECT args, status, queue_name FROM procrastinate_jobs WHERE task_name = :t"),
                                {"t": task}).all())


def test_a_jobs_result_is_queued_once_per_destination_however_often_it_is_handed_on(factory, tmp_path):
    path = _result_file(tmp_path)
    with transaction(factory) as session:
        job = _job(session, "validated")
        first = enqueue(session, path, TPS, job_id=job.id)
    with transaction(factory) as session:
        again = enqueue(session, path, TPS, job_id=job.id)  # a second run of the same job
        other = enqueue(session, path, Destination(ae_title="PACS", host="127.0.0.1", port=4242), job_id=job.id)
    assert again.id == first.id and other.id != first.id
    with factory() as session:
        assert session.query(Send).count() == 2
        messages = _messages(session, queue.TASK_SEND)
    if factory.kw["bind"].dialect.name == "postgresql":  # one message per row, on the sends queue
        assert sorted(m[0]["send_id"] for m in messages) == sorted([first.id, other.id])
        assert {m[2] for m in messages} == {"sends"}
    with pytest.raises(IntegrityError):  # and the database itself refuses a second row
        with transaction(factory) as session:
            session.add(Send(job_id=job.id, path=str(path), sop_instance_uid="1.2", destination_ae="TPS",
                             destination_host="127.0.0.1", destination_port=104, state="pending"))


def test_the_engine_message_commits_and_rolls_back_with_its_row(factory, tmp_path):
    with transaction(factory) as session:
        job = _job(session, "received")
        job_id = job.id
    with pytest.raises(RuntimeError):
        with transaction(factory) as session:
            J.transition(session, session.get(Job, job_id), "queued")
            raise RuntimeError("the unit of work fails after the move")
    with factory() as session:
        assert session.get(Job, job_id).state == "received" and _messages(session, queue.TASK_PROPAGATE) == []
    with transaction(factory) as session:
        J.transition(session, session.get(Job, job_id), "queued")
    with factory() as session:
        assert session.get(Job, job_id).state == "queued"
        messages = _messages(session, queue.TASK_PROPAGATE)
    if factory.kw["bind"].dialect.name == "postgresql":
        assert [(m[0], m[1]) for m in messages] == [({"job_id": job_id}, "todo")]
    # the task claims its row once: a second delivery of the message finds nothing to do
    assert J.claim(factory, job_id, "host:1:1#t1") is not None
    assert J.claim(factory, job_id, "host:2:2#t1") is None


def test_one_job_writes_the_same_rtstruct_uids_on_every_attempt(tmp_path):
    from converters.rtstruct_write import RoiMask, build_rtstruct
    from pipeline_helpers import synthetic_case

    case = synthetic_case(tmp_path / "case", seed=3)
    volume, mask = case["volume"], case["mask"]
    rois = [RoiMask("Tumour", mask)]
    first = build_rtstruct(volume, rois, uid_seed="rtprop-job:7:1.2.3:1.2.4")
    again = build_rtstruct(volume, [RoiMask("Tumour", np.array(mask))], uid_seed="rtprop-job:7:1.2.3:1.2.4")
    other = build_rtstruct(volume, rois, uid_seed="rtprop-job:8:1.2.3:1.2.4")
    unseeded = {build_rtstruct(volume, rois).SOPInstanceUID for _ in range(2)}
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID and first.SeriesInstanceUID != first.SOPInstanceUID
    assert len(unseeded) == 2  # rtprop convert / recontour still write new UIDs each time


def test_a_persons_resend_puts_the_same_row_back_in_the_queue(factory, tmp_path):
    path = _result_file(tmp_path)
    with transaction(factory) as session:
        job = _job(session, "validated")
        row = enqueue(session, path, TPS, job_id=job.id)
        row.state, row.attempts, row.outcome = "dead-letter", 8, "failed: association rejected"
        job_id, send_id = job.id, row.id
    with transaction(factory) as session:
        again = enqueue(session, path, TPS, job_id=job_id, again=True)
        assert (again.id, again.state, again.attempts) == (send_id, "pending", 0)
    with factory() as session:
        assert session.query(Send).count() == 1
        messages = _messages(session, queue.TASK_SEND)
    if factory.kw["bind"].dialect.name == "postgresql":
        assert [m[0] for m in messages] == [{"send_id": send_id}, {"send_id": send_id}]  # the first, and the re-send's
