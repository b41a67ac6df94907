"""Jobs per minute in the distributed mode: 1, 2 and 3 `rtprop worker` processes of the job engine on a
throw-away PostgreSQL (Debian's), weight-free classic backend, small synthetic cases
(tests/pipeline_helpers.py `synthetic_case`: 12 slices of 24x24, one box prompt).

For each worker count: a fresh database and storage, one receiver (`rtprop serve --workers 0`), the
cases sent by DCMTK storescu and completed before any worker starts; then the workers start and the
clock runs from the first `job.claimed` to the last `job.sent` in the audit (worker start-up excluded),
results delivered to a DCMTK storescp.

    nice -n 10 .venv/bin/python bench/jobs.py [--cases 24] [--workers 1 2 3]

Prints a table; writes bench/results/jobs.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from distributed_helpers import Receiver, WorkerProcess, cluster_config  # noqa: E402
from node_helpers import StoreSCP, free_port, storescu, wait_for  # noqa: E402
from pg_helpers import PostgresServer  # noqa: E402
from pipeline_helpers import synthetic_case  # noqa: E402


def run(pg: PostgresServer, work: Path, cases: list[list[Path]], workers: int) -> dict:
    url = pg.create_database()
    storage = work / "storage"
    with StoreSCP(work / "tps") as tps:
        config = cluster_config(work / "cluster.yaml", url, tps_port=tps.port,
                                pipeline={"poll_interval_s": 1.0})  # the default: idle workers poll little
        receiver = Receiver(work / "rx", config, storage, free_port()).start()
        procs: list[WorkerProcess] = []
        try:
            for files in cases:
                storescu(receiver.port, files, calling_ae="TPS")
            wait_for(lambda: pg.query(url, "SELECT count(*) FROM series WHERE state = 'complete'")[0][0]
                     == 2 * len(cases), 60, 0.2, what="every series to complete")
            procs = [WorkerProcess(work / "w", config, storage, str(i), "--concurrency", "1").start()
                     for i in range(workers)]
            wait_for(lambda: pg.query(url, "SELECT count(*) FROM jobs WHERE state = 'sent'")[0][0] == len(cases),
                     900, 0.5, what="every job to be sent")
        finally:
            for p in procs:
                p.stop()
            receiver.stop()
    first, last = pg.query(url, "SELECT (SELECT min(at) FROM audit WHERE event = 'job.claimed'), "
                                "(SELECT max(at) FROM audit WHERE event = 'job.sent')")[0]
    seconds = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    timings = [t for (t,) in pg.query(url, "SELECT timings_s FROM jobs")]
    mean = {k: round(sum(t[k] for t in timings) / len(timings), 2) for k in ("total_s", "propagate_s")}
    return {"workers": workers, "jobs": len(cases), "seconds": round(seconds, 2),
            "jobs_per_minute": round(len(cases) / seconds * 60, 1),
            "mean_job_s": mean["total_s"], "mean_propagate_s": mean["propagate_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "jobs.json")
    a = ap.parse_args()
    pg = PostgresServer().init()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="rtprop-jobs-") as tmp:
            tmp = Path(tmp)
            cases = []
            for seed in range(a.cases):
                folder = tmp / "cases" / f"c{seed:02d}"
                synthetic_case(folder, seed=500 + seed)
                cases.append(sorted(folder.iterdir()))
            for n in a.workers:
                rows.append(run(pg, tmp / f"run{n}", cases, n))
                print(f"{n} worker(s): {rows[-1]['jobs']} jobs in {rows[-1]['seconds']} s = "
                      f"{rows[-1]['jobs_per_minute']} jobs/min", flush=True)
    finally:
        pg.destroy()
    out = {"backend": "classic", "case": "synthetic_case 12x24x24, one box prompt", "runs": rows,
           "machine": platform.platform(), "cpus": os.cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print("\n| workers | jobs | seconds | jobs/min | mean s per job (child process included) | of which propagate |"
          "\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workers']} | {r['jobs']} | {r['seconds']} | {r['jobs_per_minute']} | {r['mean_job_s']} | "
              f"{r['mean_propagate_s']} |")
    print(f"({a.out})")


if __name__ == "__main__":
    main()
