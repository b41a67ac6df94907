"""Ingest benchmark: the same 500-slice series (512x512 CT, 0.5 MB each) sent by DCMTK storescu
(TCP_NODELAY=1, one association) to the rtprop node and to DCMTK storescp, in one run.

A third receiver is the ceiling for any pynetdicom-based node: a pynetdicom Storage SCP whose
handler does nothing (no file, no database), in its fastest settings (chunked receive, no DUL
reactor nap). The node cannot be faster than that.

    .venv/bin/python bench/ingest.py [--count 500] [--repeat 2] [--no-fsync]

Prints images/s for both and the ratio; writes bench/results/ingest.json.
The node is started like a clinic starts it (`rtprop serve` when available) with its normal
durability settings (fsync of every file and a committed DB row before each 0x0000) unless
--no-fsync is given.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from node_helpers import NodeProcess, StoreSCP, free_port, make_ct_series, node_command, storescu  # noqa: E402


def series(data_dir: Path, count: int) -> list[Path]:
    files = sorted(data_dir.glob("ct*.dcm"))
    if len(files) != count:
        shutil.rmtree(data_dir, ignore_errors=True)
        print(f"generating {count} synthetic 512x512 CT slices in {data_dir} ...", flush=True)
        files = make_ct_series(data_dir, count, rows=512, cols=512, spacing_mm=1.0)
    return files


def noop_pynetdicom(files: list[Path]) -> float:
    """images/s into a pynetdicom SCP that stores nothing: pynetdicom's own per-instance cost."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, _config, evt
    from pynetdicom.sop_class import CTImageStorage

    _config.LOG_HANDLER_LEVEL = "none"
    _config.STORE_RECV_CHUNKED_DATASET = True  # the data set goes to a temp file, never decoded

    def no_nap(event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = 0.0  # pynetdicom's idle nap between PDUs, a documented knob

    ae = AE(ae_title="NOOP")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_CONN_OPEN, no_nap)])
    try:
        return len(files) / timed_send(port, files, "NOOP")
    finally:
        server.shutdown()
        _config.STORE_RECV_CHUNKED_DATASET = False


def timed_send(port: int, files: list[Path], called_ae: str) -> float:
    t0 = time.perf_counter()
    storescu(port, files, called_ae=called_ae, timeout_s=600)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=500, help="slices in the series")
    ap.add_argument("--repeat", type=int, default=2, help="runs per receiver; the best is reported")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "rtprop-bench-ct512")
    ap.add_argument("--no-fsync", action="store_true", help="node with storage.fsync: false")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    a = ap.parse_args()
    files = series(a.data, a.count)
    size_mb = sum(f.stat().st_size for f in files) / a.count / 1e6
    results: dict[str, list[float]] = {"storescp": [], "rtprop": [], "pynetdicom_noop": []}
    with tempfile.TemporaryDirectory(prefix="rtprop-ingest-") as tmp:
        tmp = Path(tmp)
        for r in range(a.repeat):
            work = tmp / f"scp{r}"
            work.mkdir()
            scp = StoreSCP(work, ae_title="STORESCP").start()
            try:
                results["storescp"].append(a.count / timed_send(scp.port, files, "STORESCP"))
            finally:
                scp.stop()
            assert len(scp.files()) == a.count, f"storescp stored {len(scp.files())}"
            shutil.rmtree(work)

            root = tmp / f"node{r}"
            root.mkdir()
            node = NodeProcess(root, config={"storage": {"min_free_mb": 100, "fsync": not a.no_fsync},
                                             "node": {"series_quiet_period_s": 3600}}).start()
            try:
                results["rtprop"].append(a.count / timed_send(node.port, files, "RTPROP"))
                n = node.query("select count(*) from instances")[0][0]
            finally:
                node.stop()
            assert n == a.count, f"node recorded {n}"
            shutil.rmtree(root)
            results["pynetdicom_noop"].append(noop_pynetdicom(files))
            print(f"run {r + 1}: storescp {results['storescp'][-1]:.0f}/s, rtprop {results['rtprop'][-1]:.0f}/s, "
                  f"pynetdicom no-op {results['pynetdicom_noop'][-1]:.0f}/s", flush=True)
    best = {k: max(v) for k, v in results.items()}
    out = {
        "count": a.count, "slice_mb": round(size_mb, 3), "runs": results,
        "storescp_images_per_s": round(best["storescp"], 1), "rtprop_images_per_s": round(best["rtprop"], 1),
        "ratio": round(best["rtprop"] / best["storescp"], 3),
        "pynetdicom_noop_images_per_s": round(best["pynetdicom_noop"], 1),
        "pynetdicom_noop_ratio": round(best["pynetdicom_noop"] / best["storescp"], 3), "node_fsync": not a.no_fsync,
        "node_entry": " ".join(Path(c).name for c in node_command()), "machine": platform.platform(),
        "cpus": __import__("os").cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"storescp: {out['storescp_images_per_s']} images/s   rtprop: {out['rtprop_images_per_s']} images/s   "
          f"ratio {out['ratio']}x   ({a.out})")
    print(f"ceiling, pynetdicom SCP storing nothing: {out['pynetdicom_noop_images_per_s']} images/s "
          f"({out['pynetdicom_noop_ratio']}x storescp)")


if __name__ == "__main__":
    main()
