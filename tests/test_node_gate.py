"""The SCP's door (dicom_node/gate.py) against a real `rtprop serve` over loopback sockets.

A hostile machine's connections come from 127.0.0.2 (Linux routes all of 127/8 to loopback), the
TPS's from 127.0.0.1; the TPS is DCMTK echoscu/storescu sending the real sts-001 CT.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_helpers import ATTACKER, HalfOpen, NodeProcess, free_port, storescu, wait_for
from pipeline_helpers import STS_CT

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")
REQUEST_TIMEOUT_S = 10.0  # node.association_request_timeout_s (its default): the trickle outlasts it


def gate_config() -> dict:
    """Keys that older releases know too, so these tests run (and fail) against the code before issue 22."""
    return {"node": {"series_quiet_period_s": 1}, "storage": {"fsync": False}, "pipeline": {"poll_interval_s": 0.2},
            "web": {"heartbeat_interval_s": 0.5, "health_worker_max_age_s": 60}}


def http_json(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def echo(port: int, calling_ae: str = "TPS") -> tuple[bool, float, str]:
    import subprocess

    started = time.monotonic()
    r = subprocess.run(["echoscu", "-to", "30", "-aet", calling_ae, "-aec", "RTPROP", "127.0.0.1", str(port)],
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0, time.monotonic() - started, r.stdout + r.stderr


def test_twelve_half_open_connections_keep_no_tps_out_and_health_reports_them(tmp_path):
    """Fails on the code before issue 22: the 12 connections count against node.max_associations (10), so the
    echo is refused 'Local Limit Exceeded', the CT is refused, and /health says "ok" throughout."""
    http = free_port()
    node = NodeProcess(tmp_path / "node", config=gate_config(), allow=["TPS"])
    node.args += ["--workers", "0", "--http-port", str(http)]
    ct = sorted((STS_CT / "image").iterdir())[:48]
    with node, HalfOpen(node.port) as attack:
        time.sleep(REQUEST_TIMEOUT_S + 1)  # the first ones have timed out and been replaced: the attack goes on
        ok, took, out = echo(node.port)
        assert ok, out
        assert took < REQUEST_TIMEOUT_S, f"C-ECHO took {took:.1f} s"
        storescu(node.port, ct, calling_ae="TPS", timeout_s=120)
        stored = node.query("SELECT count(*) FROM instances WHERE calling_ae='TPS'")[0][0]
        assert stored == 48
        assert attack.opened > 12  # the node closed connections and the attacker opened more

        def refused() -> dict | None:
            status, body = http_json(http, "/health")
            recent = body["checks"].get("associations", {}).get("refused_recent", {})
            return (status, body) if {"pending_limit", "request_timeout"} <= set(recent) else None

        status, body = wait_for(refused, 10, 0.3, what="/health to report the refusals")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=30).read().decode()
    assert status == 503 and body["status"] == "degraded" and body["checks"]["scp"]["ok"]
    assoc = body["checks"]["associations"]
    assert not assoc["ok"] and ATTACKER in assoc["refused_addresses"] and "127.0.0.1" not in assoc["refused_addresses"]
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    by_reason = {s.labels["reason"]: s.value for s in families["rtprop_connections_refused"].samples
                 if s.name == "rtprop_connections_refused_total"}
    assert by_reason["pending_limit"] >= 8 and by_reason["request_timeout"] >= 4
    audited = dict(node.query("SELECT json_extract(details, '$.reason'), count(*) FROM audit "
                              "WHERE event='association.refused' GROUP BY 1"))
    assert audited.get("pending_limit") == 1 and audited.get("request_timeout") == 1  # one row a minute, not a flood


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_an_association_request_declaring_200_mib_is_refused_at_its_header(tmp_path):
    """Fails on the code before issue 22: the node read all 96 MiB into memory (peak +~100 MB) and the sender
    could send every byte."""
    node = NodeProcess(tmp_path / "node", config=gate_config(), allow=["TPS"])
    with node:
        before = rss_peak_mb(node.proc.pid)
        s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
        s.sendall(bytes([0x01, 0x00]) + (200 << 20).to_bytes(4, "big"))
        sent, error = 0, None
        try:
            for _ in range(96):
                s.sendall(b"\x00" * (1 << 20))
                sent += 1
        except OSError as exc:
            error = exc
        s.close()
        time.sleep(1)
        grown = rss_peak_mb(node.proc.pid) - before
        ok, _, out = echo(node.port)
        assert ok, out
        log = node.log()
    assert error is not None and sent < 96, f"the node took {sent} MiB"
    assert grown < 20, f"the node's peak memory grew by {grown:.0f} MB"
    assert "[request_too_large]" in log and "209715200 bytes" in log


def test_a_pdu_longer_than_the_negotiated_maximum_aborts_the_association_at_its_header(tmp_path):
    """Fails on the code before issue 22: the node negotiated an unlimited PDU size and waited for the body."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = NodeProcess(tmp_path / "node", config=gate_config(), allow=["TPS"])
    with node:
        ae = AE(ae_title="TPS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RTPROP")
        assert assoc.is_established
        negotiated = assoc.acceptor.maximum_length
        raw = assoc.dul.socket.socket
        raw.sendall(bytes([0x04, 0x00]) + (200 << 20).to_bytes(4, "big") + b"\x00" * 4096)
        wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 10, what="the node to abort the association")
        ae.shutdown()
        ok, _, out = echo(node.port)
        assert ok, out
        audit = [json.loads(d) for (d,) in node.query("SELECT details FROM audit WHERE event='association.aborted'")]
    assert negotiated == 4 << 20  # node.max_pdu_bytes
    assert [a.get("reason") for a in audit] == ["pdu_too_large"]


def raw_request(calling_ae: bytes) -> bytes:
    """An A-ASSOCIATE-RQ (Verification) as pynetdicom encodes it, with `calling_ae` (16 bytes) put in as-is."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification
    from pynetdicom.transport import AddressInformation

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "XXXXXXXXXXXXXXXX"
    primitive.called_ae_title = "RTPROP"
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 0)
    cx = build_context(Verification)
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    item = MaximumLengthNotification()
    item.maximum_length_received = 16382
    primitive.user_information = [item]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    data = bytearray(pdu.encode())
    assert len(calling_ae) == 16 and data[26:42] == b"XXXXXXXXXXXXXXXX"
    data[26:42] = calling_ae  # PS3.8 9.3.2: called AE title at bytes 11-26, calling AE title at 27-42
    return bytes(data)


def test_refusals_and_bad_pdus_are_one_escaped_log_line_each(tmp_path):
    """Fails on the code before issue 22: the AE title's newline started a forged line `FAKE: admin ok`, and
    each bad PDU wrote a multi-line traceback."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = NodeProcess(tmp_path / "node", config=gate_config(), allow=["TPS"])
    with node:
        start = len(node.log().splitlines())
        # 1. a calling AE title with a newline
        with socket.create_connection(("127.0.0.1", node.port), timeout=15) as s:
            forged_port = s.getsockname()[1]
            s.sendall(raw_request(b"X\nFAKE: admin ok"))
            assert s.recv(10)[:1] == b"\x07"  # A-ABORT: an AE title with a control character is a malformed request
        # 2. a first PDU that is no A-ASSOCIATE-RQ (unknown type 0x09)
        with socket.create_connection(("127.0.0.1", node.port), timeout=15) as s:
            junk_port = s.getsockname()[1]
            s.sendall(bytes([0x09, 0, 0, 0, 0, 4, 1, 2, 3, 4]))
            assert s.recv(10)[:1] == b"\x07"  # A-ABORT, unexpected PDU
        # 3. an allowed association, then a P-DATA-TF whose item claims more than the PDU holds
        ae = AE(ae_title="TPS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RTPROP")
        assert assoc.is_established
        assoc.dul.socket.socket.sendall(bytes([0x04, 0, 0, 0, 0, 8]) + (100).to_bytes(4, "big") + b"\x01\x03xy")
        wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 30, what="the bad PDU to end the association")
        ae.shutdown()
        time.sleep(0.5)
        lines = node.log().splitlines()[start:]
    assert not [ln for ln in lines if not re.match(r"\d{4}-\d\d-\d\d ", ln)], lines  # every line is a record
    assert not any("Traceback" in ln for ln in lines), lines
    assert [ln for ln in lines if str(forged_port) in ln] == [
        next(ln for ln in lines if "X\\nFAKE: admin ok" in ln)]
    assert len([ln for ln in lines if str(junk_port) in ln]) == 1
    assert len([ln for ln in lines if "pynetdicom" in ln]) <= 1, lines


def open_to_others(path: Path, root: Path) -> bool:
    """Could another user (group or other) read `path`: its own mode and every folder below `root` open?"""
    folders = [p for p in path.parents if p != root and root in p.parents]
    return bool(path.stat().st_mode & 0o044) and all(p.stat().st_mode & 0o011 for p in folders)


def test_the_nodes_own_files_are_for_its_user_only(tmp_path):
    """Fails on the code before issue 22: database, archive and quarantine were open to every user (0644/0755).
    Results for a TPS import share (drop-in outbox, `rtprop propagate --out`) still follow the umask."""
    node = NodeProcess(tmp_path / "node", config=gate_config(), allow=["TPS"])
    ct = sorted((STS_CT / "image").iterdir())[:2]
    bad = tmp_path / "bad.dcm"
    ds = pydicom.dcmread(ct[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = ds.PixelData[:-4096]  # shorter than Rows x Columns say: quarantined (0xA900)
    ds.save_as(bad)
    with node:
        storescu(node.port, ct, calling_ae="TPS")
        storescu(node.port, [bad], calling_ae="TPS", check=False)
        wait_for(lambda: any(p.is_file() for p in (node.storage / "quarantine").rglob("*")), 10, what="quarantine")
    storage = node.storage
    files = [p for p in storage.rglob("*") if p.is_file()]
    open_ = [f"{p.relative_to(storage)} {stat.filemode(p.stat().st_mode)}" for p in files if open_to_others(p, storage)]
    assert not open_, open_
    assert {p.name for p in files} >= {"rtprop.sqlite", "rtprop.sqlite.key"}
    assert [p for p in files if "quarantine" in p.parts and p.suffix == ".dcm"]
    assert [p for p in files if "archive" in p.parts and p.suffix == ".dcm"]
