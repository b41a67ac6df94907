"""Load: N parallel DCMTK storescu associations, --count small synthetic CT instances in total
(16x16 pixels, unique UIDs, one series per association). Checks 0 lost, 0 duplicated in archive + DB.

    .venv/bin/python bench/load.py --count 10000 --parallel 8

Exit status 1 if anything was lost or duplicated. Writes bench/results/load.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from node_helpers import ENV, NodeProcess, make_ct_series  # noqa: E402


def run(count: int, parallel: int, work: Path, max_associations: int = 16) -> dict:
    per = count // parallel
    sources = [make_ct_series(work / f"src{i}", per, prefix=f"a{i}-") for i in range(parallel)]
    total = per * parallel
    cfg = {"storage": {"min_free_mb": 100}, "node": {"series_quiet_period_s": 2, "poll_interval_s": 0.5,
                                                      "max_associations": max_associations}}
    node = NodeProcess(work / "node", config=cfg).start()
    try:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["storescu", "-aet", f"LOAD{i}", "-aec", "RTPROP", "127.0.0.1", str(node.port),
                                   *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
                 for i, files in enumerate(sources)]
        failures = []
        for p in procs:
            _, err = p.communicate(timeout=1800)
            if p.returncode != 0:
                failures.append(err.decode(errors="replace")[-500:])
        elapsed = time.perf_counter() - t0
        rows, distinct = node.query("select count(*), count(distinct sop_instance_uid) from instances")[0]
        series_counts = node.query("select sum(instance_count) from series")[0][0]
        deadline = time.monotonic() + 30  # receipts are written when each association's release is handled
        while True:
            received_audit = node.query("select coalesce(sum(json_extract(details, '$.instances')), 0) from audit "
                                        "where event='instances.received'")[0][0]  # what the receipts recorded
            if received_audit >= rows or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        node.stop()
    archive = [p for p in (node.storage / "archive").rglob("*") if p.is_file()]
    sent_uids = {p.stem for files in sources for p in files}
    return {
        "count": total, "parallel": parallel, "elapsed_s": round(elapsed, 2),
        "images_per_s": round(total / elapsed, 1), "storescu_failures": failures,
        "db_rows": rows, "db_distinct_sop": distinct, "series_instance_sum": series_counts,
        "audit_instance_received": received_audit, "archive_files": len(archive),
        "archive_temp_files": len([p for p in archive if p.name.startswith(".rtprop-tmp-")]),
        "lost": total - distinct, "duplicated": rows - distinct + max(0, len(archive) - total),
        "ok": not failures and rows == distinct == total == len(archive) == series_counts == received_audit
              and len(sent_uids) == total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtprop-load-") as tmp:
        result = run(a.count, a.parallel, Path(tmp))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
