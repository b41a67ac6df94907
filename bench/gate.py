"""The SCP's door under a hostile machine (issue 22): what an allowed TPS sees while another address holds
12 half-open connections, what /health costs, and what an oversized request costs the node.

One `rtprop serve` (allow-list TPS, web app in the node) on loopback; the hostile machine is 127.0.0.2
(tests/node_helpers.HalfOpen: the first 6 bytes of an A-ASSOCIATE-RQ, then a byte every 2 s, reopened
as the node closes them). Measured, each without and then with the 12 connections:
- C-ECHO (DCMTK echoscu, calling AE TPS): seconds per echo (median, max) and how many succeeded;
- the real sts-001 CT, first 48 images, sent by storescu: seconds and images stored;
and /health (before the attack): 100 calls one after another (seconds, audit rows written), and the
node's peak memory growth after an A-ASSOCIATE-RQ header declaring 200 MiB followed by up to 96 MiB.

    nice -n 10 .venv/bin/python bench/gate.py [--echoes 10]

Prints a table; writes bench/results/gate.json. Run from another checkout's venv to measure that
code (the node is that venv's `rtprop serve`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from node_helpers import ENV, HalfOpen, NodeProcess, free_port, storescu, wait_for  # noqa: E402
from pipeline_helpers import STS_CT  # noqa: E402


def renamed(files: list[Path], out: Path) -> list[Path]:
    """The same images as a new study, series and instances (the second send must not be duplicates)."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    study, series, paths = generate_uid(), generate_uid(), []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(out / f"{i:03d}.dcm")
        ds.save_as(paths[-1])
    return paths


def echoes(port: int, n: int) -> dict:
    times, ok = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(["echoscu", "-to", "30", "-aet", "TPS", "-aec", "RTPROP", "127.0.0.1", str(port)],
                           capture_output=True, timeout=90, env=ENV)
        times.append(time.perf_counter() - t0)
        ok += r.returncode == 0
    return {"ok": ok, "of": n, "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}


def store(node: NodeProcess, files: list[Path]) -> dict:
    before = node.query("SELECT count(*) FROM instances")[0][0]
    t0 = time.perf_counter()
    r = storescu(node.port, files, calling_ae="TPS", timeout_s=300, check=False)
    took = time.perf_counter() - t0
    return {"ok": r.returncode == 0, "seconds": round(took, 2),
            "stored": node.query("SELECT count(*) FROM instances")[0][0] - before}


def health_cost(node: NodeProcess, http: int, calls: int = 100) -> dict:
    url = f"http://127.0.0.1:{http}/health"
    audit_before = node.query("SELECT count(*) FROM audit")[0][0]
    t0 = time.perf_counter()
    for _ in range(calls):
        try:
            urllib.request.urlopen(url, timeout=30).read()
        except urllib.error.HTTPError as exc:  # 503 is an answer too
            exc.read()
    took = time.perf_counter() - t0
    return {"calls": calls, "seconds": round(took, 2), "audit_rows_written": node.query(
        "SELECT count(*) FROM audit")[0][0] - audit_before}


def peak_mb(pid: int) -> float:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def oversized_request(node: NodeProcess) -> dict:
    before = peak_mb(node.proc.pid)
    s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
    s.sendall(bytes([0x01, 0x00]) + (200 << 20).to_bytes(4, "big"))
    sent = 0
    try:
        for _ in range(96):
            s.sendall(b"\x00" * (1 << 20))
            sent += 1
    except OSError:
        pass
    s.close()
    time.sleep(1)
    return {"mib_the_node_took": sent, "peak_rss_growth_mb": round(peak_mb(node.proc.pid) - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--echoes", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gate.json")
    args = ap.parse_args()
    ct = sorted((STS_CT / "image").iterdir())[:48]
    http = free_port()
    work = Path(tempfile.mkdtemp(prefix="rtprop-bench-gate-"))
    again = renamed(ct, work / "ct-again")
    node = NodeProcess(work, allow=["TPS"], config={"storage": {"fsync": False}, "web": {"heartbeat_interval_s": 1}})
    node.args += ["--workers", "0", "--http-port", str(http)]
    result: dict = {"code": str(REPO), "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}}
    with node:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5).status == 200, 30,
                 what="the web app")
        store(node, renamed(ct, work / "warm-up"))  # not measured: the first series pays for imports and caches
        result["quiet"] = {"echo": echoes(node.port, args.echoes), "ct48": store(node, ct)}
        time.sleep(2)  # the web app sees the node's heartbeat of a quiet node
        result["health"] = health_cost(node, http)
        with HalfOpen(node.port) as attack:
            time.sleep(12)  # past node.association_request_timeout_s: the first ones were closed and reopened
            result["twelve_half_open"] = {"echo": echoes(node.port, args.echoes), "ct48": store(node, again)}
            result["twelve_half_open"]["connections_opened"] = attack.opened
        result["oversized_request"] = oversized_request(node)
    print(f"{'':28}{'quiet':>22}{'12 half-open':>22}")
    for key, label in (("echo", "C-ECHO ok / median s"), ("ct48", "48 CT images stored / s")):
        q, a = result["quiet"][key], result["twelve_half_open"][key]
        fmt = (lambda d: f"{d['ok']}/{d['of']} {d['median_s']:.3f}") if key == "echo" else \
            (lambda d: f"{d['stored']} {d['seconds']:.2f}")
        print(f"{label:28}{fmt(q):>22}{fmt(a):>22}")
    h, o = result["health"], result["oversized_request"]
    print(f"/health x{h['calls']}: {h['seconds']:.2f} s, {h['audit_rows_written']} audit rows written")
    print(f"200 MiB request: the node took {o['mib_the_node_took']} MiB, peak memory +{o['peak_rss_growth_mb']} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
