"""Nightly batch on the shared real data (sts-001 CT and MR GTVs): drift CSV, PNG montage, audit; the
scheduler's window logic; `rtprop audit verify` on a DB produced by real runs."""
from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
from datetime import datetime
from pathlib import Path

import pydicom
import pytest

from node_helpers import VENV_BIN
from pipeline_helpers import STS_CT, ingest_sts_archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A storage root with sts-001 CT + MR and their GTV RTSTRUCTs taken in as the node does."""
    from config.load import load_config, resolve_storage
    from db.engine import open_database

    root = tmp_path_factory.mktemp("storage")
    config = resolve_storage(load_config(None, overrides={"storage": {"root": str(root), "fsync": False},
                                                          "node": {"series_quiet_period_s": 0}}))
    ingest_sts_archive(config, open_database(config.storage.database))
    return root


def test_batch_drift_report_on_sts001(tmp_path, archive):
    out = tmp_path / "report"
    r = subprocess.run([str(VENV_BIN / "rtprop"), "batch", "--storage", str(archive), "--roi-regex", "GTV.*",
                        "--out", str(out), "--since", "2000-01-01"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert "rtprop batch" in r.stderr  # the tqdm progress bar
    rows = list(csv.DictReader(open(summary["csv"])))
    assert sorted(row["roi"] for row in rows) == ["GTV_Mass_CT", "GTV_Mass_MR_T1"]
    # each structure is scored on the series it was drawn on (the MR GTV once went to the CT, unflagged)
    assert {row["roi"]: row["modality"] for row in rows} == {"GTV_Mass_CT": "CT", "GTV_Mass_MR_T1": "MR"}
    for row in rows:
        assert row["error"] == ""
        assert 0.3 < float(row["dice"]) <= 1 and float(row["hd95_mm"]) > 0 and float(row["volume_ratio"]) > 0
        assert Path(row["new_rtstruct"]).is_file()
    print("drift:", {row["roi"]: (row["dice"], row["hd95_mm"], row["volume_ratio"]) for row in rows},
          "montage:", summary["montage"])
    montage = Path(summary["montage"])
    assert montage.stat().st_size > 10_000 and montage.read_bytes()[:4] == b"\x89PNG"
    with sqlite3.connect(archive / "rtprop.sqlite") as con:
        events = [e for (e,) in con.execute("SELECT event FROM audit WHERE component='batch'")]
        assert events.count("batch.roi") == 2 and "batch.started" in events and "batch.finished" in events
        assert con.execute("SELECT count(*) FROM sends").fetchone()[0] == 0  # not sent unless asked


def test_audit_verify_detects_one_altered_row_in_a_real_run_db(tmp_path, archive):
    """After real ingest + batch rows: verify passes; editing one row (triggers dropped, as an attacker
    with file access would) makes `rtprop audit verify` exit 3 naming that row."""
    import shutil

    storage = tmp_path / "copy"
    shutil.copytree(archive, storage)
    verify = [str(VENV_BIN / "rtprop"), "audit", "verify", "--storage", str(storage)]
    ok = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with sqlite3.connect(storage / "rtprop.sqlite") as con:
        rows = con.execute("SELECT id FROM audit WHERE event='series.complete'").fetchall()
        target = rows[0][0]
        con.execute("DROP TRIGGER audit_no_update")
        con.execute("UPDATE audit SET calling_ae='FORGED' WHERE id=?", (target,))
    bad = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3
    problems = json.loads(bad.stdout)["problems"]
    assert [p["row_id"] for p in problems] == [target]


def test_scheduler_window_and_once_per_night(tmp_path):
    from config.load import load_config, resolve_storage
    from db.audit import record
    from db.engine import open_database, transaction
    from pipeline.scheduler import due, window_date

    config = resolve_storage(load_config(None, overrides={
        "storage": {"root": str(tmp_path)}, "batch": {"enabled": True, "window_start": "22:30",
                                                      "window_end": "04:00"}}))
    assert window_date(datetime(2026, 3, 1, 23, 0), config.batch).isoformat() == "2026-03-01"
    assert window_date(datetime(2026, 3, 2, 3, 59), config.batch).isoformat() == "2026-03-01"
    assert window_date(datetime(2026, 3, 2, 12, 0), config.batch) is None
    factory = open_database(config.storage.database)
    assert due(factory, config, datetime(2026, 3, 2, 1, 0)).isoformat() == "2026-03-01"
    with transaction(factory) as session:
        record(session, "batch.scheduled", component="scheduler", window_date="2026-03-01")
    assert due(factory, config, datetime(2026, 3, 2, 1, 0)) is None  # a restart in the window: not again
    config.batch.enabled = False
    assert due(factory, config, datetime(2026, 3, 2, 23, 0)) is None


def test_an_ambiguous_series_is_reported_never_guessed(tmp_path):
    """Two CT series in the RTSTRUCT's Frame of Reference, none holding the referenced images: the batch
    names both candidates in drift.csv and re-contours nothing, rather than pick one."""
    import pydicom
    from pydicom.uid import generate_uid

    from config.load import load_config, resolve_storage
    from db.engine import open_database
    from dicom_node.completion import CompletionChecker
    from dicom_node.storage import Received, Store

    config = resolve_storage(load_config(None, overrides={"storage": {"root": str(tmp_path / "s"), "fsync": False},
                                                          "node": {"series_quiet_period_s": 0}}))
    factory = open_database(config.storage.database)
    store = Store(config.storage, factory, fsync=False)
    copy_uid = generate_uid()
    for path in sorted((STS_CT / "image").iterdir()):
        assert store.ingest(path.read_bytes(), Received(calling_ae="ARCHIVE", source="import")).status == 0
        ds = pydicom.dcmread(path)  # a second reconstruction of the same scan: same frame, new UIDs
        ds.SeriesInstanceUID, ds.SOPInstanceUID = copy_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / "copy.dcm")
        assert store.ingest((tmp_path / "copy.dcm").read_bytes(), Received(calling_ae="ARCHIVE")).status == 0
    rs = next((STS_CT / "rtstruct").iterdir())
    assert store.ingest(rs.read_bytes(), Received(calling_ae="ARCHIVE")).status == 0
    CompletionChecker(factory, config).check()
    from pipeline.batch import run_batch

    summary = run_batch(factory, config, roi_regex="GTV.*", out=tmp_path / "report", progress=False)
    rows = list(csv.DictReader(open(summary["csv"])))
    assert len(rows) == 1 and rows[0]["dice"] == ""
    assert "ambiguous" in rows[0]["error"] and copy_uid in rows[0]["error"]
    assert pydicom.dcmread(next((STS_CT / "image").iterdir())).SeriesInstanceUID in rows[0]["error"]


def test_a_batch_sent_under_review_before_send_waits_for_a_reviewer_then_goes_out_once(tmp_path):
    """`rtprop batch --send` with review.before_send: each new RTSTRUCT is a job of kind `batch` that waits in
    the review queue; nothing reaches the TPS (the node's sender running meanwhile) until a reviewer accepts,
    then it goes out once, through the same durable send as a job's result (issue 21, item 1)."""
    import time

    from config.load import load_config, resolve_storage
    from db.engine import open_database
    from node_helpers import NodeProcess, StoreSCP, wait_for
    from web_helpers import Client, WebProcess, add_user, token

    with StoreSCP(tmp_path / "tps") as tps:
        node = NodeProcess(tmp_path / "node", config={
            "storage": {"fsync": False}, "review": {"before_send": True},
            "pipeline": {"poll_interval_s": 0.2},
            "node": {"series_quiet_period_s": 0, "poll_interval_s": 0.2, "default_destination": "tps",
                     "destinations": {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.port}}}})
        config = resolve_storage(load_config(node.config_path, overrides={"storage": {"root": str(node.storage)}}))
        ingest_sts_archive(config, open_database(config.storage.database))
        r = subprocess.run([str(VENV_BIN / "rtprop"), "batch", "--config", str(node.config_path), "--storage",
                            str(node.storage), "--roi-regex", "GTV_Mass_CT", "--send", "--no-progress", "--out",
                            str(tmp_path / "report")], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        row = next(csv.DictReader(open(json.loads(r.stdout.strip().splitlines()[-1])["csv"])))
        assert node.query("SELECT count(*) FROM sends") == [(0,)]  # nothing queued for the TPS
        assert row["delivery"] == "awaiting_review" and row["sent"] == "False", row
        job_id = int(row["job"])
        assert node.query("SELECT kind, state FROM jobs WHERE id=?", (job_id,)) == [("batch", "awaiting_review")]
        with node:  # its sender and workers run: the archive's own RTSTRUCTs get jobs (no prompt: failed)
            wait_for(lambda: node.query("SELECT count(*) FROM jobs WHERE kind='prompt' AND state='failed'")[0][0] == 2,
                     120, what="the node's housekeeping passes")
            time.sleep(2)
            assert node.query("SELECT count(*) FROM sends") == [(0,)] and tps.stores_received() == 0
            add_user(node.storage, "rita", "reviewer", "a-long-password")
            with WebProcess(tmp_path, node.storage, node.config_path) as web:
                client = Client(web.url)
                assert client.login("rita", "a-long-password") == 303
                status, _, page = client.get("/jobs?state=awaiting_review")
                assert status == 200 and f"/jobs/{job_id}".encode() in page  # in the review queue
                status, _, page = client.get(f"/jobs/{job_id}")
                assert status == 200 and f"TPS@127.0.0.1:{tps.port}".encode() in page  # where it will go
                assert client.get(f"/jobs/{job_id}/review")[0] == 200
                api = Client(web.url)
                headers = {"Authorization": f"Bearer {token(node.storage, 'rita')}"}
                status, _, body = api.post(f"/api/v1/jobs/{job_id}/review", body={"decision": "accept"},
                                           headers=headers)
                assert status == 200 and json.loads(body)["state"] == "sending", body
            wait_for(lambda: node.query("SELECT state FROM jobs WHERE id=?", (job_id,)) == [("sent",)], 120,
                     what="the accepted batch result to be sent")
            time.sleep(2)
        assert tps.stores_received() == 1 and len(tps.files()) == 1
        sent = pydicom.dcmread(tps.files()[0])
        assert str(sent.SOPInstanceUID) == node.query("SELECT result_sop_instance_uid FROM jobs WHERE id=?",
                                                      (job_id,))[0][0]
        assert [str(r.ROIName) for r in sent.StructureSetROISequence] == ["GTV_Mass_CT_prop"]


def test_a_batch_tells_patients_apart_and_every_run_shows_on_the_batch_page(tmp_path):
    """Two patients with the same ROI on the same modality: the summary once keyed both as `CT:ROI` (one
    lost), drift.csv and the /batch page named cases only by UID, and a run written with --out elsewhere did not
    show on /batch (issue 21, item 9)."""
    from config.load import load_config, resolve_storage
    from db.audit import hash_patient_id, site_key
    from db.engine import open_database
    from dicom_node.completion import CompletionChecker
    from dicom_node.storage import Received, Store
    from pipeline_helpers import case_files, copy_as_new_patient
    from web_helpers import Client, WebProcess, add_user

    storage = tmp_path / "storage"
    config = resolve_storage(load_config(None, overrides={"storage": {"root": str(storage), "fsync": False},
                                                          "node": {"series_quiet_period_s": 0}}))
    factory = open_database(config.storage.database)
    store = Store(config.storage, factory, fsync=False)
    for path in case_files(STS_CT) + copy_as_new_patient(case_files(STS_CT), tmp_path / "copy", "STS_COPY"):
        assert store.ingest(Path(path).read_bytes(), Received(calling_ae="ARCHIVE", source="import")).status == 0
    CompletionChecker(factory, config).check()
    key = site_key(factory)
    factory.kw["bind"].dispose()
    elsewhere = tmp_path / "reports-elsewhere"
    r = subprocess.run([str(VENV_BIN / "rtprop"), "batch", "--storage", str(storage), "--roi-regex", "GTV_Mass_CT",
                        "--out", str(elsewhere), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    labels = {hash_patient_id("STS_001", key)[:12], hash_patient_id("STS_COPY", key)[:12]}
    assert len(summary["dice"]) == 2 and {key.split("/")[0] for key in summary["dice"]} == labels
    rows = list(csv.DictReader(open(summary["csv"])))
    assert {row["patient"] for row in rows} == labels and all(row["study_instance_uid"] for row in rows)
    add_user(storage, "vic", "viewer", "a-long-password")
    with WebProcess(tmp_path, storage) as web:
        client = Client(web.url)
        assert client.login("vic", "a-long-password") == 303
        status, _, page = client.get("/batch")
        assert status == 200 and Path(summary["out"]).name.encode() in page and str(elsewhere).encode() in page
        assert all(label.encode() in page for label in labels)
        assert client.get(f"/batch/{Path(summary['out']).name}/montage.png")[0] == 200
