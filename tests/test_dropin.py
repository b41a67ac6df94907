"""Folder drop-in on real files and a real SQLite DB: 20 cases at once, 2 corrupt."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from node_helpers import wait_for
from pipeline_helpers import synthetic_case


def _config(root: Path, **dropin):
    from config.load import load_config, resolve_storage

    return resolve_storage(load_config(None, overrides={
        "storage": {"root": str(root), "fsync": False},
        "node": {"series_quiet_period_s": 0, "series_gap_timeout_s": 1},
        "pipeline": {"poll_interval_s": 0.1, "isolate_jobs": False},
        "dropin": {"enabled": True, "stable_s": 0.5, "poll_interval_s": 0.2, **dropin}}))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """20 synthetic cases (CT phantom + box prompt), made once; case 07 has a truncated slice, case 13 a
    garbage RTSTRUCT."""
    root = tmp_path_factory.mktemp("cases")
    for i in range(20):
        synthetic_case(root / f"case{i:02d}", seed=i)
    bad_slice = sorted((root / "case07").glob("IMG*.dcm"))[5]
    bad_slice.write_bytes(bad_slice.read_bytes()[:600])  # cut inside the header: a transfer that broke off
    (root / "case13" / "RS_prompt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(300))
    return root


def _all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".reason.json")]


def test_twenty_cases_two_corrupt(tmp_path, cases):
    from db.engine import open_database
    from dicom_node.completion import CompletionChecker
    from pipeline.dropin import DropIn
    from pipeline.worker import Worker

    config = _config(tmp_path / "storage")
    factory = open_database(config.storage.database)
    watcher = DropIn(factory, config)
    staging = tmp_path / "staging"
    shutil.copytree(cases, staging)
    dropped = len(_all_files(staging))
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for case in sorted(staging.iterdir()):  # all 20 appear at once (rename is atomic)
            os.replace(case, watcher.paths.inbox / case.name)
        wait_for(lambda: not any(watcher.paths.inbox.iterdir()), 120, 0.2, what="the inbox to empty")
    finally:
        stop.set()
        thread.join(10)
    checker = CompletionChecker(factory, config)
    checker.check()
    Worker(factory, config).drain(timeout_s=300)

    outputs = sorted(watcher.paths.outbox.glob("*__RS_*.dcm"))
    assert len(outputs) == 18
    assert {p.name.split("__")[0] for p in outputs} == {f"case{i:02d}" for i in range(20)} - {"case07", "case13"}
    quarantined = sorted(p for p in watcher.paths.quarantine.iterdir() if p.is_dir())
    assert [p.name.split("-", 1)[1] for p in quarantined] == ["case07", "case13"]
    reasons = {p.name.split("-", 1)[1].split(".")[0]: json.loads(p.read_text())
               for p in watcher.paths.quarantine.glob("*.reason.json")}
    assert "IMG" in " ".join(reasons["case07"]["problems"])
    assert "RS_prompt.dcm" in " ".join(reasons["case13"]["problems"])
    # nothing deleted: every dropped file is in done/ or quarantine/
    kept = len(_all_files(watcher.paths.done)) + len(_all_files(watcher.paths.quarantine))
    assert kept == dropped
    assert len(list(watcher.paths.done.iterdir())) == 18

    from pipeline.jobs import counts
    with factory() as session:
        assert counts(session)["sent"] == 18
    # the results are RTSTRUCTs on the dropped series, one structure each
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series
    done_case = next(p for p in watcher.paths.done.iterdir() if p.name.endswith("case03"))
    out = next(p for p in outputs if p.name.startswith("case03__"))
    ss = read_rtstruct(out, read_series(done_case))
    assert [r.name for r in ss.rois] == ["Tumour_prop"] and ss.rois[0].mask.sum() > 0


def test_growing_file_waits_until_stable(tmp_path, cases):
    from db.engine import open_database
    from pipeline.dropin import DropIn

    config = _config(tmp_path / "storage", stable_s=2.0)
    watcher = DropIn(factory := open_database(config.storage.database), config)
    case = watcher.paths.inbox / "case00"
    shutil.copytree(cases / "case00", case)
    t0 = time.monotonic()
    assert watcher.scan(now=t0) == []  # first sight
    assert watcher.scan(now=t0 + 1.0) == []  # not yet stable
    (case / "late.dcm").write_bytes((cases / "case00" / "RS_prompt.dcm").read_bytes())  # still copying
    assert watcher.scan(now=t0 + 2.5) == []  # changed: the clock starts again
    outcomes = watcher.scan(now=t0 + 5.0)
    assert [o.name for o in outcomes] == ["case00"] and outcomes[0].ok
    factory.kw["bind"].dispose()


def test_once_takes_every_stable_case_in_one_call_and_the_worker_finds_its_job(tmp_path, cases):
    """`rtprop dropin --once` with the default stable_s (5 s) waits for stability itself and takes
    everything in one call; the series are complete at once, so one `rtprop worker --once` runs the job."""
    import subprocess
    import sys

    storage = tmp_path / "storage"
    inbox = storage / "inbox"
    inbox.mkdir(parents=True)
    shutil.copytree(cases / "case02", inbox / "case02")
    shutil.copytree(cases / "case04", inbox / "case04")
    cli = [sys.executable, "-m", "cli"]
    cfg = tmp_path / "rtprop.yaml"
    cfg.write_text("storage: {fsync: false}\npipeline: {isolate_jobs: false}\n")
    t0 = time.monotonic()
    taken = subprocess.run(cli + ["dropin", "--once", "--storage", str(storage), "--config", str(cfg)],
                           capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0, taken.stderr
    summary = json.loads(taken.stdout.strip().splitlines()[-1])
    assert sorted(summary["taken"]) == ["case02", "case04"] and summary["left_in_inbox"] == []
    assert time.monotonic() - t0 >= 5.0  # it waited the stable time rather than taking nothing
    ran = subprocess.run(cli + ["worker", "--once", "--storage", str(storage), "--config", str(cfg)],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.strip().splitlines()[-1])["jobs"]["sent"] == 2
    assert sorted(p.name.split("__")[0] for p in (storage / "dropin-outbox").glob("*__RS_*.dcm")) == ["case02", "case04"]
