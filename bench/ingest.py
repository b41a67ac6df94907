"""Ingest benchmark: the same 500-slice series (512x512 CT, 0.5 MB each) sent by DCMTK storescu
(TCP_NODELAY=1) in 1 association and in 8 parallel associations, to DCMTK storescp (`--fork` for the
parallel case) and to rtprop, in one run. rtprop receivers: one `rtprop serve` on SQLite (the
default); one `rtprop serve --workers 0` on PostgreSQL; and, for the parallel case, two of them on
one port (node.reuse_port, SO_REUSEPORT) sharing the PostgreSQL database and the archive.

A third receiver is the ceiling for any pynetdicom-based node: a pynetdicom Storage SCP whose
handler does nothing (no file, no database), in its fastest settings (chunked receive, no DUL
reactor nap). The node cannot be faster than that.

    nice -n 10 .venv/bin/python bench/ingest.py [--count 500] [--repeat 2] [--parallel 1 8] [--no-fsync]

Prints images/s per receiver and the ratio to storescp; writes bench/results/ingest.json.
The node is started like a clinic starts it (`rtprop serve` when available) with its normal
durability settings (fsync of every file and a committed DB row before each 0x0000) unless
--no-fsync is given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from node_helpers import ENV, NodeProcess, StoreSCP, free_port, make_ct_series, node_command, storescu  # noqa: E402


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


def timed_send(port: int, files: list[Path], called_ae: str, parallel: int = 1) -> float:
    """Seconds to send `files` in `parallel` storescu associations at once (contiguous shares)."""
    if parallel == 1:
        t0 = time.perf_counter()
        storescu(port, files, called_ae=called_ae, timeout_s=600)
        return time.perf_counter() - t0
    shares = [files[i::parallel] for i in range(parallel)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", f"BENCH{i}", "-aec", called_ae, "127.0.0.1", str(port),
                               *map(str, share)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
             for i, share in enumerate(shares)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    elapsed = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise AssertionError(f"storescu failed: {[e[-300:] for e in errors]}")
    return elapsed


CPU: dict[str, list[float]] = {}  # receiver name -> CPU ms per instance (the receivers' processes, the database's)


def cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and their children (a postmaster's: its backends)."""
    import psutil

    total = 0.0
    procs = [psutil.Process(p) for p in pids]
    procs += [c for p in list(procs) for c in p.children(recursive=True)]
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system  # reaped children too (--fork)
        except psutil.Error:
            pass
    return total


def measured(name: str, pids: list[int], send) -> float:  # type: ignore[no-untyped-def]
    """Run `send()` (returns seconds) and note the receivers' CPU ms per instance under `name`."""
    before = cpu_s(pids)
    seconds = send()
    CPU.setdefault(name, []).append(round((cpu_s(pids) - before) * 1000 / COUNT[0], 2))
    return seconds


COUNT = [0]


def storescp_rate(work: Path, files: list[Path], parallel: int) -> float:
    scp = StoreSCP(work, ae_title="STORESCP", extra=["--fork"] if parallel > 1 else []).start()
    try:
        rate = len(files) / measured(f"storescp/{parallel}", [scp.proc.pid],
                                     lambda: timed_send(scp.port, files, "STORESCP", parallel))
    finally:
        scp.stop()
    assert len(scp.files()) == len(files), f"storescp stored {len(scp.files())}"
    shutil.rmtree(work)
    return rate


def sqlite_node_rate(work: Path, files: list[Path], parallel: int, fsync: bool) -> float:
    node = NodeProcess(work, config={"storage": {"min_free_mb": 100, "fsync": fsync},
                                     "node": {"series_quiet_period_s": 3600, "max_associations": 16}}).start()
    try:
        rate = len(files) / measured(f"rtprop_sqlite/{parallel}", [node.proc.pid],
                                     lambda: timed_send(node.port, files, "RTPROP", parallel))
        n = node.query("select count(*) from instances")[0][0]
    finally:
        node.stop()
    assert n == len(files), f"node recorded {n}"
    shutil.rmtree(work)
    return rate


def postgres_node_rate(pg, work: Path, files: list[Path], parallel: int, fsync: bool, receivers: int) -> float:
    """`receivers` x `rtprop serve --workers 0` on one port (node.reuse_port) and one PostgreSQL database."""
    from distributed_helpers import Receiver, cluster_config

    url = pg.create_database()
    work.mkdir(parents=True, exist_ok=True)
    config = cluster_config(work / "cluster.yaml", url, storage={"fsync": fsync},
                            node={"series_quiet_period_s": 3600, "reuse_port": receivers > 1})
    port = free_port()
    nodes = [Receiver(work / f"rx{i}", config, work / "storage", port).start() for i in range(receivers)]
    try:
        rate = len(files) / measured(f"rtprop_postgres_{receivers}/{parallel}",
                                     [n.proc.pid for n in nodes] + [pg.postmaster_pid()],
                                     lambda: timed_send(port, files, "RTPROP", parallel))
    finally:
        for node in nodes:
            node.stop()
    n = pg.query(url, "select count(*) from instances")[0][0]
    assert n == len(files), f"node recorded {n}"
    shutil.rmtree(work)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=500, help="slices in the series")
    ap.add_argument("--repeat", type=int, default=2, help="runs per receiver; the best is reported")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 8], help="storescu associations at once")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "rtprop-bench-ct512")
    ap.add_argument("--no-fsync", action="store_true", help="node with storage.fsync: false")
    ap.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL receivers")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    a = ap.parse_args()
    files = series(a.data, a.count)
    COUNT[0] = len(files)
    size_mb = sum(f.stat().st_size for f in files) / a.count / 1e6
    pg = None
    if not a.no_postgres:
        from pg_helpers import PostgresServer

        pg = PostgresServer().init()
    table: dict[str, dict[str, list[float]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="rtprop-ingest-") as tmp:
            tmp = Path(tmp)
            for parallel in a.parallel:
                runs = table.setdefault(str(parallel), {})
                for r in range(a.repeat):
                    work = tmp / f"p{parallel}r{r}"
                    runs.setdefault("storescp", []).append(storescp_rate(work / "scp", files, parallel))
                    runs.setdefault("rtprop_sqlite", []).append(
                        sqlite_node_rate(work / "node", files, parallel, not a.no_fsync))
                    if pg is not None:
                        runs.setdefault("rtprop_postgres_1", []).append(
                            postgres_node_rate(pg, work / "pg1", files, parallel, not a.no_fsync, 1))
                        if parallel > 1:
                            runs.setdefault("rtprop_postgres_2", []).append(
                                postgres_node_rate(pg, work / "pg2", files, parallel, not a.no_fsync, 2))
                    if parallel == 1:
                        runs.setdefault("pynetdicom_noop", []).append(noop_pynetdicom(files))
                    print(f"{parallel} association(s), run {r + 1}: " + ", ".join(
                        f"{k} {v[-1]:.0f}/s" for k, v in runs.items()), flush=True)
    finally:
        if pg is not None:
            pg.destroy()
    best = {p: {k: round(max(v), 1) for k, v in runs.items()} for p, runs in table.items()}
    out = {
        "count": a.count, "slice_mb": round(size_mb, 3), "runs": table, "images_per_s": best,
        "ratio_to_storescp": {p: {k: round(v / b["storescp"], 3) for k, v in b.items() if k != "storescp"}
                              for p, b in best.items()},
        "cpu_ms_per_instance": {k: min(v) for k, v in CPU.items()},
        "cpu_note": "CPU of the receiving processes (storescp: with its --fork children; rtprop_postgres_*: the "
                    "receivers plus every PostgreSQL server process) per instance, best run",
        "node_fsync": not a.no_fsync, "storescp_parallel": "--fork",
        "receivers": {"rtprop_sqlite": "1 x rtprop serve, SQLite", "rtprop_postgres_1": "1 x rtprop serve "
                      "--workers 0, PostgreSQL", "rtprop_postgres_2": "2 x rtprop serve --workers 0 on one port "
                      "(node.reuse_port), one PostgreSQL"},
        "node_entry": " ".join(Path(c).name for c in node_command()), "machine": platform.platform(),
        "cpus": os.cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # the single-association figures of earlier releases, under their old names
    if "1" in best:
        out.update(storescp_images_per_s=best["1"]["storescp"], rtprop_images_per_s=best["1"]["rtprop_sqlite"],
                   ratio=round(best["1"]["rtprop_sqlite"] / best["1"]["storescp"], 3))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    names = sorted({k for b in best.values() for k in b})
    print("\n| associations | " + " | ".join(names) + " |\n| --- |" + " --- |" * len(names))
    for p, b in best.items():
        print(f"| {p} | " + " | ".join(f"{b[k]:.0f}/s ({b[k] / b['storescp']:.2f}x)" if k in b else "-"
                                      for k in names) + " |")
    print("\nCPU ms per instance (receivers; PostgreSQL's own processes included for rtprop_postgres_*):")
    for k, v in sorted(out["cpu_ms_per_instance"].items()):
        print(f"  {k}: {v}")
    print(f"({a.out})")


if __name__ == "__main__":
    main()
