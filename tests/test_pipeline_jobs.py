"""The job state machine on a real SQLite file: allowed moves only, atomic claims, idempotent creation,
recovery of a dead worker's job; docker-compose.yml consistent with the CLI."""
from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from db.engine import open_database, transaction
from db.schema import AuditEntry, Job, utcnow
from pipeline import jobs as J

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def factory(tmp_path):
    f = open_database(tmp_path / "db.sqlite")
    yield f
    f.kw["bind"].dispose()


def _queued(factory, n=1):
    ids = []
    for i in range(n):
        with transaction(factory) as s:
            job, _ = J.create_job(s, rtstruct_uid=f"1.2.3.{i}", study_uid="1.2", calling_ae="TPS")
            J.transition(s, job, "queued", series_instance_uid="1.2.9")
            ids.append(job.id)
    return ids


def test_only_documented_transitions(factory):
    (job_id,) = _queued(factory)
    with transaction(factory) as s:
        job = s.get(Job, job_id)
        with pytest.raises(J.JobStateError, match="queued -> sent is not allowed"):
            J.transition(s, job, "sent")
    for state, targets in J.TRANSITIONS.items():
        for target in J.STATES:
            if target in targets:
                J.check_transition(1, state, target)
            else:
                with pytest.raises(J.JobStateError):
                    J.check_transition(1, state, target)
    assert all(not J.TRANSITIONS[s] for s in J.FINAL_STATES)


def test_one_job_per_rtstruct(factory):
    with transaction(factory) as s:
        a, created_a = J.create_job(s, rtstruct_uid="1.2.3", study_uid="1.2", calling_ae="TPS")
    with transaction(factory) as s:
        b, created_b = J.create_job(s, rtstruct_uid="1.2.3", study_uid="1.2", calling_ae="TPS")
    assert created_a and not created_b and a.id == b.id
    with factory() as s:
        assert s.query(Job).count() == 1


def test_claims_are_atomic_across_threads(factory):
    _queued(factory, 10)
    claimed, lock = [], threading.Lock()

    def grab(name):
        while (job := J.claim_next(factory, name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 11))  # each job exactly once
    with factory() as s:
        assert {j.state for j in s.query(Job)} == {"running"} and {j.attempts for j in s.query(Job)} == {1}
        assert s.query(AuditEntry).filter(AuditEntry.event == "job.claimed").count() == 10


def test_dead_worker_job_requeued_then_dead_lettered(factory):
    (job_id,) = _queued(factory)
    for attempt in range(1, 4):
        job = J.claim_next(factory, "host:1:1#w0")
        assert job.id == job_id and job.attempts == attempt
        later = utcnow() + timedelta(seconds=120)
        moved = J.recover_stale(factory, heartbeat_timeout_s=60, max_attempts=3, now=later)
        assert moved == [job_id]
        with factory() as s:
            state = s.get(Job, job_id).state
        assert state == ("queued" if attempt < 3 else "dead-letter")
    assert J.claim_next(factory, "w") is None


def test_fresh_heartbeat_is_left_alone(factory):
    _queued(factory)
    job = J.claim_next(factory, "w")
    assert J.heartbeat(factory, job.id, "w")
    assert J.recover_stale(factory, heartbeat_timeout_s=60, max_attempts=3) == []
    assert not J.heartbeat(factory, job.id, "someone-else")


def test_compose_file_matches_the_cli():
    from click.testing import CliRunner

    from cli.main import cli

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    node = compose["services"]["rtprop"]
    assert {"rtprop", "orthanc"} <= set(compose["services"])
    assert "11112:11112" in node["ports"]
    targets = {v.split(":")[1] for v in node["volumes"]}
    assert {"/data", "/models"} <= targets
    command = node["command"]
    assert command[:2] == ["rtprop", "serve"]
    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    for flag in (a for a in command[2:] if a.startswith("--")):
        assert flag in help_text, flag
    assert (REPO / "Dockerfile").is_file() and node["build"] == "."
    orthanc = yaml.safe_load(compose["services"]["orthanc"]["environment"]["ORTHANC_JSON"])
    assert orthanc["DicomModalities"]["rtprop"] == ["RTPROP", "rtprop", 11112]


def test_an_implausible_result_is_held_for_a_person_and_nothing_is_sent(tmp_path):
    """guard.hold_implausible (default on): a box drawn on the wrong structure gives a result the guard
    flags; the job waits in awaiting_review with the reasons, nothing goes out, and the RTSTRUCT says it
    (description; for Eclipse the name too). The same case boxed right is sent, unflagged."""
    import shutil

    import pydicom

    from config.load import load_config, resolve_storage
    from db.schema import Send
    from pipeline_helpers import make_prompt_rtstruct, synthetic_case
    from web_helpers import run_dropped_cases

    cases = tmp_path / "cases"
    right = synthetic_case(cases / "right", seed=21, size=48, slices=12)
    synthetic_case(cases / "wrong", seed=21, size=48, slices=12)
    mask, z = right["mask"], 6
    rows, cols = np.flatnonzero(mask[z].any(axis=1)), np.flatnonzero(mask[z].any(axis=0))
    x1, y1 = int(cols[-1]), int(rows[-1])
    volume = right["volume"]
    (cases / "wrong" / "RS_prompt.dcm").unlink()
    make_prompt_rtstruct(volume, cases / "wrong" / "RS_prompt.dcm",  # over the soft tissue beside it
                         boxes=[("Tumour", z, (x1 - 3, y1 - 3, min(47, x1 + 20), min(47, y1 + 20)))])
    config = resolve_storage(load_config(None, environ={}, overrides={
        "storage": {"root": str(tmp_path / "s"), "fsync": False}, "node": {"series_quiet_period_s": 0},
        "pipeline": {"isolate_jobs": False}, "dropin": {"stable_s": 0}, "rtstruct": {"tps_profile": "eclipse"}}))
    factory, _ = run_dropped_cases(config, [cases / "right", cases / "wrong"])
    with factory() as s:
        jobs = {j.dropin_case: j for j in s.query(Job)}
        sends = s.query(Send).count()
        held = [e for e in s.query(AuditEntry).filter(AuditEntry.event == "job.held")]
    assert jobs["right"].state == "sent" and jobs["right"].waiting_for == ""
    wrong = jobs["wrong"]
    assert wrong.state == "awaiting_review" and wrong.waiting_for.startswith("held, the result looks implausible")
    assert len(held) == 1 and held[0].job_id == wrong.id and sends == 0
    outputs = sorted(p.name for p in config.dropin.outbox.glob("*__RS_*.dcm"))
    assert len(outputs) == 1 and outputs[0].startswith("right__")  # nothing of the held job went out
    ds = pydicom.dcmread(wrong.result_path)
    roi = ds.StructureSetROISequence[0]
    assert roi.ROIName.endswith("_CHK_prop") and str(roi.ROIDescription).startswith("CHECK: ")
    shutil.rmtree(cases)
