"""Review before send and a person's actions (pipeline/actions.py) on real jobs: drop-in cases through the
real pipeline, a real SQLite database, real RTSTRUCT files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from pipeline_helpers import make_prompt_rtstruct, synthetic_case
from web_helpers import run_dropped_cases


def setup(root: Path, cases: list[Path], **review):
    from config.load import load_config, resolve_storage

    config = resolve_storage(load_config(None, overrides={
        "storage": {"root": str(root), "fsync": False}, "node": {"series_quiet_period_s": 0},
        "pipeline": {"poll_interval_s": 0.1, "isolate_jobs": False}, "dropin": {"stable_s": 0}, "review": review}))
    factory, worker = run_dropped_cases(config, cases)
    return config, factory, worker


@pytest.fixture(scope="module")
def two_roi_case(tmp_path_factory):
    """A phantom with a box prompt for "Tumour" and one for "Shadow" on the same slice."""
    from converters.series import read_series

    folder = tmp_path_factory.mktemp("cases") / "case2"
    case = synthetic_case(folder, seed=5)
    (folder / "RS_prompt.dcm").unlink()
    volume = read_series(folder)
    z = volume.array.shape[0] // 2
    rows, cols = np.flatnonzero(case["mask"][z].any(axis=1)), np.flatnonzero(case["mask"][z].any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
    make_prompt_rtstruct(volume, folder / "RS_prompt.dcm", boxes=[("Tumour", z, box), ("Shadow", z, box)])
    return folder


def states(factory) -> list[str]:
    from db.schema import Job

    with factory() as s:
        return list(s.execute(select(Job.state).order_by(Job.id)).scalars())


def test_review_is_required_per_calling_ae(tmp_path, two_roi_case):
    _, held, _ = setup(tmp_path / "a", [two_roi_case], before_send=False, per_calling_ae={"DROPIN": True})
    _, passed, _ = setup(tmp_path / "b", [two_roi_case], before_send=True, per_calling_ae={"DROPIN": False})
    assert states(held) == ["awaiting_review"] and states(passed) == ["sent"]
    assert not list((tmp_path / "a" / "dropin-outbox").glob("*.dcm"))


def test_mixed_decisions_send_only_the_accepted_roi(tmp_path, two_roi_case):
    from db.schema import Job
    from pipeline import actions

    config, factory, _ = setup(tmp_path, [two_roi_case], before_send=True)
    with factory() as s:
        job = s.execute(select(Job)).scalar()
    assert actions.result_rois(job.result_path) == ["Tumour_prop", "Shadow_prop"]
    out = actions.review(factory, config, job.id, "mara", roi="Shadow_prop", decision="reject", rating=5,
                         comment="not a structure")
    assert out.state == "awaiting_review" and "1 still to review" in out.message
    with pytest.raises(actions.ActionError, match="already rejected by mara"):
        actions.review(factory, config, job.id, "lena", roi="Shadow_prop", decision="accept")
    with pytest.raises(actions.ActionError, match="no ROI 'Nope'"):
        actions.review(factory, config, job.id, "mara", roi="Nope", decision="accept")
    out = actions.review(factory, config, job.id, "mara", roi=None, decision="accept", rating=1)
    assert out.state == "sent"
    (delivered,) = (tmp_path / "dropin-outbox").glob("*.dcm")
    ds = pydicom.dcmread(delivered)
    original = pydicom.dcmread(job.result_path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Tumour_prop"]
    assert len(ds.ROIContourSequence) == 1 and len(ds.RTROIObservationsSequence) == 1
    assert ds.SOPInstanceUID != original.SOPInstanceUID and ds.SeriesInstanceUID == original.SeriesInstanceUID
    assert ds.ROIContourSequence[0].ContourSequence[0].ContourData == \
        original.ROIContourSequence[0].ContourSequence[0].ContourData
    # the job's result, as its page and the API show it, is what left: the accepted ROIs (issue 21, item 11)
    with factory() as s:
        after = s.get(Job, job.id)
        assert actions.result_rois(after.result_path) == ["Tumour_prop"] and after.result_path != job.result_path
        assert after.result_sop_instance_uid == ds.SOPInstanceUID != after.rtstruct_sop_instance_uid
    with pytest.raises(actions.ActionError, match="final"):
        actions.review(factory, config, job.id, "mara", roi=None, decision="reject")


def test_reject_all_closes_the_job_and_retry_cancel_follow_the_state_machine(tmp_path, two_roi_case):
    from db.audit import query, verify
    from db.engine import transaction
    from db.schema import Job
    from pipeline import actions
    from pipeline import jobs as J

    config, factory, worker = setup(tmp_path, [two_roi_case], before_send=True)
    with factory() as s:
        job_id = s.execute(select(Job.id)).scalar()
    out = actions.review(factory, config, job_id, "mara", roi=None, decision="reject")
    assert out.state == "rejected" and not list((tmp_path / "dropin-outbox").glob("*.dcm"))
    for act in (lambda: actions.retry(factory, job_id, "ada"), lambda: actions.cancel(factory, job_id, "ada"),
                lambda: actions.resend(factory, config, job_id, "ada")):
        with pytest.raises(actions.ActionError):
            act()
    # a failed job: a person's retry runs it again (the state machine alone never leaves `failed`)
    with transaction(factory) as s:
        job = s.get(Job, job_id)
        s.execute(Job.__table__.update().where(Job.id == job_id).values(state="awaiting_review"))
        J.transition(s, job, "failed", error="test: made to fail")
        with pytest.raises(J.JobStateError):
            J.transition(s, job, "queued")  # not without by_person=True
    assert actions.retry(factory, job_id, "ada").state == "queued"
    worker.drain(120)
    assert states(factory) == ["awaiting_review"]
    assert actions.cancel(factory, job_id, "ada").state == "cancelled"
    with factory() as s:
        rows = {r.event: r for r in query(s, job_id=job_id)}
        assert '"user":"ada"' in rows["job.retried"].details and '"user":"ada"' in rows["job.cancelled"].details
        assert verify(s)[1] == []


def test_quarantined_instance_is_released_by_re_ingest(tmp_path):
    import json

    from config.load import load_config, resolve_storage
    from db.engine import open_database
    from db.schema import Instance
    from dicom_node.storage import Received, Store
    from node_helpers import make_ct_slice
    from pipeline import actions

    config = resolve_storage(load_config(None, overrides={"storage": {"root": str(tmp_path), "fsync": False}}))
    factory = open_database(config.storage.database)
    store = Store(config.storage, factory, fsync=False)
    ds = make_ct_slice("1.2.3", "1.2.3.4", 0)
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    held = store.quarantine(buf.getvalue(), Received(calling_ae="TPS"), 0x0110, "database unavailable (test)")
    items = actions.quarantined_files(config)
    assert [i["file"] for i in items] == [str(held)] and items[0]["reason"] == "database unavailable (test)"
    out = actions.release(factory, config, items[0]["id"], "ada")
    assert "released" in out.message and actions.quarantined_files(config) == []
    with factory() as s:
        assert s.execute(select(Instance.sop_instance_uid)).scalars().all() == [ds.SOPInstanceUID]
    kept = list((tmp_path / "quarantine" / "released").rglob("*.reason.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["reason"].startswith("database")
