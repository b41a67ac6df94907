"""How long one write unit of work holds the write lock: the receive path's `record_instance` (instance row,
series row, audit row with its hash chain read) in one process, one after the other, on SQLite and on a
throw-away PostgreSQL (Debian's). Every writer of every process and host is serialised by that lock
(db/engine.py: BEGIN IMMEDIATE / pg_advisory_xact_lock), so 1000 / (ms per unit) is the most write units
per second the whole node can commit, however many receivers and workers it has.

    nice -n 10 .venv/bin/python bench/write_lock.py [--count 2000]

Prints a table; writes bench/results/write_lock.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from pg_helpers import PostgresServer  # noqa: E402


def units_per_s(location, head: Path, count: int) -> dict:  # type: ignore[no-untyped-def]
    from db.engine import open_database
    from db.instances import NewInstance, record_instance
    from db.schema import utcnow

    factory = open_database(location, head_path=head)
    times = []
    for i in range(count):
        new = NewInstance(sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          series_instance_uid=f"1.2.4.{i // 100}", study_instance_uid="1.2.5", modality="CT",
                          patient_id_hash="", path=f"/archive/{i}.dcm", sha256="0" * 64, transfer_syntax_uid="",
                          calling_ae="BENCH", peer_address="127.0.0.1:1", source="dimse", received_at=utcnow())
        t0 = time.perf_counter()
        record_instance(factory, new, lambda: None)
        times.append(time.perf_counter() - t0)
    factory.kw["bind"].dispose()
    times.sort()
    ms = sum(times) / len(times) * 1000
    return {"units": count, "mean_ms": round(ms, 3), "p50_ms": round(times[len(times) // 2] * 1000, 3),
            "p95_ms": round(times[int(len(times) * 0.95)] * 1000, 3), "max_units_per_s": round(1000 / ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "write_lock.json")
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="rtprop-lock-") as tmp:
        tmp = Path(tmp)
        results["sqlite"] = units_per_s(tmp / "rtprop.sqlite", tmp / "sqlite.head", a.count)
        pg = PostgresServer().init()
        try:
            results["postgresql"] = units_per_s(pg.create_database(), tmp / "pg.head", a.count)
        finally:
            pg.destroy()
    out = {"unit": "db.instances.record_instance (3 inserts/updates + the audit chain read)", "results": results,
           "machine": platform.platform(), "cpus": os.cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print("| database | mean ms | p50 ms | p95 ms | most units/s |\n| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['mean_ms']} | {r['p50_ms']} | {r['p95_ms']} | {r['max_units_per_s']} |")
    print(f"({a.out})")


if __name__ == "__main__":
    main()
