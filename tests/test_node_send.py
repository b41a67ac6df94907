"""Sending back: a DCMTK storescp plays the TPS. Delivered once, retried when it is down, dead-lettered
when it never comes, a warning is stored (sent once, "sent with warning"), routing rules."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import RTStructureSetStorage

from sqlalchemy import select

from config.load import load_config, resolve_storage
from config.schema import Config, Destination
from db.engine import open_database, transaction
from db.schema import Send
from dicom_node.routing import RoutingError, resolve_destination
from dicom_node.scu import deliver_due, enqueue
from node_helpers import NodeProcess, StoreSCP, enqueue_file, free_port, wait_for

# Seconds the TPS stays down in the fault test; the figure is 60 (bench option:
# RTPROP_TPS_DOWN_S=60 .venv/bin/pytest tests/test_node_send.py -k down).
TPS_DOWN_S = float(os.environ.get("RTPROP_TPS_DOWN_S", "4"))


def _rs(shared_data: Path, tmp_path: Path) -> Path:
    """The result file lives in the node's outbox, as the pipeline will put it."""
    dst = tmp_path / "outbox-result.dcm"
    shutil.copy(shared_data / "sts-001" / "CT" / "rtstruct" / "RS.dcm", dst)
    return dst


def _node_cfg(**node: object) -> dict:
    return {"node": {"poll_interval_s": 0.2, "send_backoff_s": 0.5, "send_backoff_max_s": 2.0, **node},
            "storage": {"min_free_mb": 10}}


def send_and_wait(node: NodeProcess, path: Path, scp: StoreSCP, timeout_s: float = 30) -> int:
    """Queue `path` for `scp` through the node's DB and wait until the row is sent; returns the send id.
    (Reusable by the pipeline's end-to-end test.)"""
    send_id = enqueue_file(node.db_path, path, scp.ae_title, "127.0.0.1", scp.port)
    wait_for(lambda: node.query("select state from sends where id=?", (send_id,))[0][0] == "sent", timeout_s,
             what=f"send {send_id} sent")
    return send_id


def test_enqueued_result_arrives_once(tmp_path: Path, shared_data: Path) -> None:
    rs = _rs(shared_data, tmp_path)
    with StoreSCP(tmp_path) as scp, NodeProcess(tmp_path / "n", config=_node_cfg()) as node:
        send_id = send_and_wait(node, rs, scp)
        time.sleep(1.0)  # nothing more arrives
        assert len(scp.files()) == 1 and scp.stores_received() == 1
        state, status, attempts = node.query("select state, last_status, attempts from sends where id=?", (send_id,))[0]
        events = [e for (e,) in node.query("select event from audit where event like 'send.%' order by id")]
    assert (state, status, attempts) == ("sent", 0, 1)
    assert events == ["send.queued", "send.attempt", "send.sent"]
    got, sent = dcmread(scp.files()[0]), dcmread(rs)
    assert got.SOPInstanceUID == sent.SOPInstanceUID
    assert got.ROIContourSequence[0].ContourSequence[0].ContourData == sent.ROIContourSequence[0].ContourSequence[0].ContourData


def test_receiver_down_then_up_delivered_once(tmp_path: Path, shared_data: Path) -> None:
    rs = _rs(shared_data, tmp_path)
    scp = StoreSCP(tmp_path)  # port reserved, not listening yet: the TPS is down
    with NodeProcess(tmp_path / "n", config=_node_cfg(send_max_attempts=50)) as node:
        send_id = enqueue_file(node.db_path, rs, scp.ae_title, "127.0.0.1", scp.port)
        time.sleep(TPS_DOWN_S)
        failed = node.query("select count(*) from audit where event='send.failed'")[0][0]
        assert failed >= 2, "the sender should have retried while the TPS was down"
        assert node.query("select state from sends")[0][0] == "pending"
        with scp:
            wait_for(lambda: node.query("select state from sends where id=?", (send_id,))[0][0] == "sent",
                     30, what="delivery after the TPS came back")
            time.sleep(1.0)
            assert len(scp.files()) == 1 and scp.stores_received() == 1
        attempts, status = node.query("select attempts, last_status from sends")[0]
        # more attempts may fail between the count above and the receiver starting: count them all now
        failed_total = node.query("select count(*) from audit where event='send.failed'")[0][0]
    assert attempts == failed_total + 1 and status == 0


def test_never_reachable_goes_to_dead_letter(tmp_path: Path, shared_data: Path) -> None:
    rs = _rs(shared_data, tmp_path)
    with NodeProcess(tmp_path / "n", config=_node_cfg(send_max_attempts=3, send_backoff_s=0.1)) as node:
        enqueue_file(node.db_path, rs, "TPS", "127.0.0.1", free_port())
        wait_for(lambda: node.query("select state from sends")[0][0] == "dead-letter", 20, what="dead-letter")
        assert node.query("select attempts, sent_at from sends")[0] == (3, None)
        assert node.query("select count(*) from audit where event='send.dead_letter'")[0][0] == 1
        assert node.query("select count(*) from audit where event='send.sent'")[0][0] == 0


@pytest.mark.parametrize("status", [0x0107, 0x0116, 0xB000, 0xB006, 0xA700, 0xC000])
def test_warning_means_stored_once_failure_retried(tmp_path: Path, shared_data: Path, status: int) -> None:
    """A warning (0x0107 attribute list, 0x0116 value out of range, 0xBxxx coercion ...) means the TPS
    stored it: sent once, recorded as "sent with warning", never re-sent; a failure is retried."""
    rs = _rs(shared_data, tmp_path)
    calls: list[str] = []

    def handle(event: evt.Event) -> int:
        calls.append(str(event.request.AffectedSOPInstanceUID))
        return status

    ae = AE("TPS")
    ae.add_supported_context(RTStructureSetStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        cfg = resolve_storage(load_config(None, overrides={"storage": {"root": str(tmp_path / "s")},
                              "node": {"send_max_attempts": 2, "send_backoff_s": 0}}))
        factory = open_database(cfg.storage.database)
        with transaction(factory) as s:
            enqueue(s, rs, Destination(ae_title="TPS", host="127.0.0.1", port=port))
        first = deliver_due(factory, cfg)
        second = deliver_due(factory, cfg)
        third = deliver_due(factory, cfg)
        with factory() as s:
            row = s.execute(select(Send)).scalar_one()
    finally:
        server.shutdown()
    if status in (0x0107, 0x0116, 0xB000, 0xB006):  # warnings (PS3.7 C.1.3: the peer stored it)
        assert [o.state for o in first] == ["sent"] and second == [] == third and len(calls) == 1
        assert (row.state, row.last_status, row.attempts) == ("sent", status, 1)
        assert row.outcome.startswith(f"sent with warning 0x{status:04X}")
    else:
        assert [o.state for o in first] == ["pending"] and [o.state for o in second] == ["dead-letter"]
        assert len(calls) == 2 and row.state == "dead-letter" and row.outcome.startswith(f"failed 0x{status:04X}")


def test_routing_rules() -> None:
    cfg = Config.model_validate({"node": {
        "destinations": {"eclipse": {"ae_title": "ECLIPSE", "host": "10.0.0.5", "port": 104},
                         "ray": {"ae_title": "RAY", "host": "10.0.0.6", "port": 104}},
        "routes": [{"calling_ae": "RAYSTATION", "destination": "ray"},
                   {"calling_ae": "TEST_TPS", "destination": "ray", "dry_run": True}],
        "default_destination": "eclipse"}})
    assert resolve_destination(cfg, "RAYSTATION").destination.ae_title == "RAY"
    r = resolve_destination(cfg, "TEST_TPS")
    assert r.dry_run and r.name == "ray"
    assert resolve_destination(cfg, "ECLIPSE_X").name == "eclipse"
    with pytest.raises(RoutingError, match="no route"):
        resolve_destination(Config(), "ANY")


def test_the_destination_flag_beats_the_files_routes() -> None:
    """docker-compose's trial sent results to the example file's placeholder 127.0.0.1:104: the file's
    route for the calling AE won over --destination. The flag wins now (dry-run rules stay)."""
    from dicom_node.routing import with_destination

    cfg = Config.model_validate({"node": {
        "destinations": {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 104}},
        "routes": [{"calling_ae": "ORTHANC", "destination": "tps"},
                   {"calling_ae": "SHADOW", "destination": "tps", "dry_run": True}],
        "default_destination": "tps"}})
    cfg = with_destination(cfg, "ORTHANC@orthanc:4242")
    for ae in ("ORTHANC", "ECLIPSE", ""):
        route = resolve_destination(cfg, ae)
        assert (route.destination.ae_title, route.destination.host, route.destination.port) == ("ORTHANC", "orthanc",
                                                                                               4242)
    assert resolve_destination(cfg, "SHADOW").dry_run
    with pytest.raises(RoutingError, match="AE@HOST:PORT"):
        with_destination(cfg, "orthanc:4242")


def test_a_route_to_an_unknown_destination_stops_the_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  routes:\n    - {calling_ae: ECLIPSE, destination: eclipse}\n")
    res = subprocess.run([sys.executable, "-m", "cli", "serve", "--config", str(bad), "--storage",
                          str(tmp_path / "s"), "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "node.routes[0]" in res.stderr and "'eclipse'" in res.stderr
