"""Receiving with real DCMTK peers: echo, the real sts-001 CT + RTSTRUCT, completion, gaps, allow-list, space."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path


from node_helpers import ENV, VENV_BIN, NodeProcess, echoscu, make_ct_series, storescu, wait_for

FAST = {"series_quiet_period_s": 1.0, "poll_interval_s": 0.2}


def _dataset_sha(path: Path) -> str:
    raw = path.read_bytes()
    start = 144 + int.from_bytes(raw[140:144], "little") if raw[128:132] == b"DICM" else 0
    return hashlib.sha256(raw[start:]).hexdigest()


def audit_verify(storage: Path) -> subprocess.CompletedProcess:
    """`rtprop audit verify` as an operator runs it (exit 0, or 3 naming the rows)."""
    return subprocess.run([str(VENV_BIN / "rtprop"), "audit", "verify", "--storage", str(storage)],
                          capture_output=True, text=True, timeout=120)


def test_echo_and_real_ct_series_with_rtstruct(tmp_path: Path, shared_data: Path) -> None:
    ct = sorted((shared_data / "sts-001" / "CT" / "image").glob("*.dcm"))
    rs = shared_data / "sts-001" / "CT" / "rtstruct" / "RS.dcm"
    assert len(ct) == 59
    with NodeProcess(tmp_path, config={"node": FAST, "storage": {"min_free_mb": 10}}) as node:
        assert echoscu(node.port)
        storescu(node.port, [*ct, rs])
        # recorded before success: rows exist the moment storescu returns
        assert node.query("select count(*) from instances")[0][0] == 60
        states = wait_for(lambda: (r := dict(node.query("select modality, state from series")))
                          and all(v == "complete" for v in r.values()) and r, 15, what="series complete")
        assert states == {"CT": "complete", "RTSTRUCT": "complete"}
        # same series again: idempotent (no new file, no new row), audited as duplicates
        storescu(node.port, ct[:5])
        assert node.query("select count(*) from instances")[0][0] == 60
        assert node.query("select count(*) from audit where event='instance.duplicate'")[0][0] == 5
        rows = node.query("select path, sha256, calling_ae, peer_address from instances")
        events = dict(node.query("select event, count(*) from audit group by event"))
        # the release is audited after the peer has its answer: wait for both stores' ends
        ends = wait_for(lambda: (e := [json.loads(d) for (d,) in node.query(
            "select details from audit where event='association.released'")])
            and sum(1 for x in e if x["instances_stored"]) >= 2 and e, 10, what="both releases audited")
    files = [p for p in (node.storage / "archive").rglob("*") if p.is_file()]
    assert len(files) == 60 and not [p for p in files if p.name.startswith(".rtprop-tmp-")]
    for path, sha, ae, peer in rows:
        assert Path(path).is_file() and _dataset_sha(Path(path)) == sha
        assert ae == "TPS" and peer.startswith("127.0.0.1:")
        # layout: archive/<study UID>/<series UID>/<SOP UID>.dcm, no names
        assert Path(path).relative_to(node.storage / "archive").parts[0][0].isdigit()
    assert events["series.complete"] == 2
    # each association's end is audited with what it brought (the echo probes bring nothing)
    assert sorted(e["instances_stored"] for e in ends if e["instances_stored"]) == [5, 60]
    # ... and what it stored is in the chain once per series, not once per instance: the 59 CT images and the
    # RTSTRUCT under one receipt; the re-send stored nothing new, so it has none
    assert "instance.received" not in events
    receipts = [json.loads(d) for (d,) in node.query("select details from audit where event='instances.received'")]
    assert sorted(r["instances"] for r in receipts) == [1, 59] and len({r["receipt"] for r in receipts}) == 1
    verified = audit_verify(node.storage)
    assert verified.returncode == 0 and json.loads(verified.stdout)["instances"] == 60
    assert "Synthetic" not in node.log() and "STS_001" not in node.log()


def test_gap_keeps_series_waiting_then_failed(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "gap", 12, skip=(5, 6))
    cfg = {"node": {**FAST, "series_gap_timeout_s": 3.0}, "storage": {"min_free_mb": 10}}
    with NodeProcess(tmp_path / "n", config=cfg) as node:
        storescu(node.port, files)
        wait_for(lambda: node.query("select count(*) from audit where event='series.waiting'")[0][0], 10,
                 what="series.waiting")
        assert node.query("select state from series")[0][0] == "receiving"
        wait_for(lambda: node.query("select state from series")[0][0] == "failed", 15, what="series failed")
        details = json.loads(node.query("select details from audit where event='series.incomplete'")[0][0])
    assert details["missing_positions_mm"] == [12.5, 15.0]


def test_complete_on_release(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", 6)
    cfg = {"node": {"series_quiet_period_s": 3600, "complete_on_release": True, "poll_interval_s": 5},
           "storage": {"min_free_mb": 10}}
    with NodeProcess(tmp_path / "n", config=cfg) as node:
        storescu(node.port, files)
        wait_for(lambda: node.query("select state from series")[0][0] == "complete", 5, what="complete on release")


def test_unknown_calling_ae_rejected(tmp_path: Path) -> None:
    with NodeProcess(tmp_path, allow=["TPS"], config={"storage": {"min_free_mb": 10}}) as node:
        assert echoscu(node.port, calling_ae="TPS")
        r = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "RTPROP", "127.0.0.1", str(node.port)],
                           capture_output=True, text=True, timeout=20, env=ENV)
        assert r.returncode != 0
        assert "Calling AE Title Not Recognized" in (r.stdout + r.stderr)
        rows = wait_for(lambda: node.query("select calling_ae from audit where event='association.rejected'"), 5)
        assert rows == [("INTRUDER",)]
        assert echoscu(node.port, calling_ae="TPS")  # still serving


def test_low_disk_space_refused_with_a700(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", 3)
    with NodeProcess(tmp_path / "n", config={"storage": {"min_free_mb": 10**9}}) as node:
        r = storescu(node.port, files, extra=["-v"], check=False)
        # storescu stops the transfer at the first refusal (0xA700 = "Refused: OutOfResources")
        assert "Refused: OutOfResources" in r.stderr
        assert node.query("select count(*) from instances")[0][0] == 0
        assert node.query("select count(*) from audit where event='instance.refused'")[0][0] >= 1
        assert echoscu(node.port)
    assert not [p for p in (node.storage / "archive").rglob("*") if p.is_file()]


def test_the_node_warns_at_start_when_the_disk_is_below_the_watermark(tmp_path):
    """It used to start "ready" and then refuse every instance without a word."""
    import shutil

    free_mb = shutil.disk_usage(tmp_path).free // (1 << 20)
    with NodeProcess(tmp_path / "n", config={"storage": {"min_free_mb": free_mb + 10_000}}) as node:
        wait_for(lambda: node.query("SELECT count(*) FROM audit WHERE event='node.low_disk'")[0][0] == 1, 10,
                 what="the low-disk audit row")
        log = node.log()
    assert "below storage.min_free_mb" in log and "will be refused" in log
