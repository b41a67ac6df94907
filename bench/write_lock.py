"""Instances per second the whole node can commit: the receive path's unit of work (`db.instances.record_instance`:
the instance row, its series row, and before issue 23 an audit row appended to the hash chain under the cluster-wide
write lock) run by several writer processes at once, as receivers of several associations do, on a throw-away
PostgreSQL (Debian's) and on SQLite.

Before issue 23 every unit took the cluster-wide lock (`pg_advisory_xact_lock` / BEGIN IMMEDIATE) and appended to
the one audit chain, so the whole cluster committed one unit after another however many receivers it had. Now an
instance row takes no cluster-wide lock (only its series row's), and the audit records each association once.
`--before DIR` runs the same measurement on the code in DIR (e.g. `git archive <base> | tar -x -C DIR`), in a
child process, for the before/after table.

    nice -n 10 .venv/bin/python bench/write_lock.py [--count 2000] [--writers 8] [--before DIR]

First the ceiling the cluster-wide lock itself sets (1000 / ms it is held per instance, however many cores);
then writers each receive their own series (several studies at once: the cluster's capacity) and, second, all one
series (one series split over associations: its row lock serialises them). Prints a table; writes
bench/results/write_lock.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _writer(code: str, location: str, head: str, writer: int, count: int, same_series: bool, start, out) -> None:
    sys.path.insert(0, code)
    from db.engine import open_database
    from db.instances import NewInstance, record_instance
    from db.schema import utcnow

    factory = open_database(location, head_path=head)
    start.wait()
    t0 = time.perf_counter()
    for i in range(count):
        series = "1.2.4.0" if same_series else f"1.2.4.{writer}"
        new = NewInstance(sop_instance_uid=f"1.2.3.{writer}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          series_instance_uid=series, study_instance_uid="1.2.5", modality="CT", patient_id_hash="",
                          path=f"/archive/{writer}/{i}.dcm", sha256="0" * 64, transfer_syntax_uid="",
                          calling_ae="BENCH", peer_address="127.0.0.1:1", source="dimse", received_at=utcnow())
        record_instance(factory, new, lambda: None)
    out.put((t0, time.perf_counter()))
    factory.kw["bind"].dispose()


def cluster_rate(code: str, location: str, head: str, count: int, writers: int, same_series: bool) -> dict:
    """`writers` processes commit `count` units in all; instances per second from the first start to the last end."""
    ctx = mp.get_context("spawn")
    sys.path.insert(0, code)
    from db.engine import open_database

    open_database(location, head_path=head).kw["bind"].dispose()  # migrated once, before the clock
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(code, str(location), head, w, count // writers, same_series, start, out))
             for w in range(writers)]
    for p in procs:
        p.start()
    time.sleep(3.0)  # every writer connected and migrated-checked
    start.set()
    spans = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(60)
    seconds = max(e for _, e in spans) - min(s for s, _ in spans)
    units = count // writers * writers
    return {"units": units, "writers": writers, "seconds": round(seconds, 2), "instances_per_s": round(units / seconds)}


def lock_ceiling(code: str, location: str, head: str, count: int, per_association: int = 500) -> dict:
    """What the cluster-wide lock allows, whatever the cores: 1000 / (ms it is held per instance). Before, every
    unit held it (one after the other, in one process); now only the receipt of each association does
    (db/receipts.py close_receipt, timed for associations of `per_association` instances)."""
    sys.path.insert(0, code)
    from db.engine import open_database, transaction
    from db.instances import NewInstance, record_instance
    from db.schema import utcnow

    factory = open_database(location, head_path=head)
    has_receipts = "receipt" in NewInstance.__dataclass_fields__
    unit_ms, close_ms = [], []
    for a in range(max(1, count // per_association)):
        receipt = f"{a:032d}"
        for i in range(per_association):
            new = NewInstance(sop_instance_uid=f"1.2.6.{a}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                              series_instance_uid=f"1.2.6.{a}", study_instance_uid="1.2.5", modality="CT",
                              patient_id_hash="", path=f"/archive/{a}/{i}.dcm", sha256="0" * 64,
                              transfer_syntax_uid="", calling_ae="BENCH", peer_address="127.0.0.1:1", source="dimse",
                              received_at=utcnow(), **({"receipt": receipt} if has_receipts else {}))
            t0 = time.perf_counter()
            if has_receipts:
                from db.instances import NewReceipt

                first = NewReceipt(receipt, "bench", "BENCH", "", "dimse", utcnow()) if i == 0 else None
                record_instance(factory, new, lambda: None, first)
            else:
                record_instance(factory, new, lambda: None)
            unit_ms.append((time.perf_counter() - t0) * 1000)
        if has_receipts:
            from db.receipts import close_receipt

            t0 = time.perf_counter()
            with transaction(factory) as session:
                close_receipt(session, receipt, "released")
            close_ms.append((time.perf_counter() - t0) * 1000)
    factory.kw["bind"].dispose()
    unit = sum(unit_ms) / len(unit_ms)
    held = sum(close_ms) / len(close_ms) / per_association if close_ms else unit
    if close_ms and not str(location).startswith("postgresql"):
        held += unit  # SQLite's own lock (BEGIN IMMEDIATE) still serialises every writer: one file, one machine
    return {"unit_ms": round(unit, 3), "locked_ms_per_instance": round(held, 4),
            "what_holds_the_lock": ("the receipt of each association" if str(location).startswith("postgresql")
                                    else "every unit (SQLite) and the receipts") if close_ms else "every unit",
            "ceiling_instances_per_s": round(1000 / held)}


def measure(code: str, count: int, writers: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from pg_helpers import PostgresServer

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rtprop-lock-") as tmp:
        tmp = Path(tmp)
        pg = PostgresServer().init()
        try:
            results["postgresql/lock_ceiling"] = lock_ceiling(code, pg.create_database(), str(tmp / "pgc.head"), count)
            results["sqlite/lock_ceiling"] = lock_ceiling(code, str(tmp / "c.sqlite"), str(tmp / "c.head"), count)
            for same in (False, True):
                name = "one_series" if same else "own_series"
                results[f"postgresql/{name}"] = cluster_rate(code, pg.create_database(), str(tmp / f"pg{name}.head"),
                                                             count, writers, same)
                results[f"sqlite/{name}"] = cluster_rate(code, str(tmp / f"{name}.sqlite"),
                                                         str(tmp / f"{name}.head"), count, writers, same)
        finally:
            pg.destroy()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000, help="units of work in all, per case")
    ap.add_argument("--writers", type=int, default=8, help="writer processes at once")
    ap.add_argument("--before", type=Path, help="a checkout of the code before, measured the same way")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # measure the code there, print JSON
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "write_lock.json")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(str(a.child), a.count, a.writers)))
        return
    runs = {}
    if a.before:
        done = subprocess.run([sys.executable, __file__, "--child", str(a.before), "--count", str(a.count),
                               "--writers", str(a.writers)], capture_output=True, text=True, check=True)
        runs["before"] = json.loads(done.stdout.strip().splitlines()[-1])
    runs["after"] = measure(str(REPO), a.count, a.writers)
    out = {"unit": "db.instances.record_instance, by concurrent writer processes", "runs": runs,
           "machine": platform.platform(), "cpus": os.cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rate = lambda r: r.get("instances_per_s") or r["ceiling_instances_per_s"]  # noqa: E731
    if "before" in runs:
        out["speedup"] = {k: round(rate(runs["after"][k]) / rate(v), 2) for k, v in runs["before"].items()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"| case | {' | '.join(runs)} |{' speed-up |' if 'before' in runs else ''}\n"
          f"| --- |{' --- |' * (len(runs) + ('before' in runs))}")
    for case in runs["after"]:
        cells = " | ".join(f"{rate(r[case])}/s" for r in runs.values())
        who = "the lock's ceiling" if case.endswith("ceiling") else f"{a.writers} writers"
        print(f"| {case} ({who}) | {cells} |" + (f" {out['speedup'][case]}x |" if "before" in runs else ""))
    print(f"({a.out})")


if __name__ == "__main__":
    main()
