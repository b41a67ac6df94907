"""Ingest benchmark: the same 500-slice series (512x512 CT, 0.5 MB each) sent by DCMTK storescu
(TCP_NODELAY=1, one association) to the rtprop node and to DCMTK storescp, in one run.

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

from node_helpers import NodeProcess, StoreSCP, make_ct_series, node_command, storescu  # noqa: E402


def series(data_dir: Path, count: int) -> list[Path]:
    files = sorted(data_dir.glob("ct*.dcm"))
    if len(files) != count:
        shutil.rmtree(data_dir, ignore_errors=True)
        print(f"generating {count} synthetic 512x512 CT slices in {data_dir} ...", flush=True)
        files = make_ct_series(data_dir, count, rows=512, cols=512, spacing_mm=1.0)
    return files


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
    results: dict[str, list[float]] = {"storescp": [], "rtprop": []}
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
            print(f"run {r + 1}: storescp {results['storescp'][-1]:.0f}/s, rtprop {results['rtprop'][-1]:.0f}/s",
                  flush=True)
    best = {k: max(v) for k, v in results.items()}
    out = {
        "count": a.count, "slice_mb": round(size_mb, 3), "runs": results,
        "storescp_images_per_s": round(best["storescp"], 1), "rtprop_images_per_s": round(best["rtprop"], 1),
        "ratio": round(best["rtprop"] / best["storescp"], 3), "node_fsync": not a.no_fsync,
        "node_entry": " ".join(Path(c).name for c in node_command()), "machine": platform.platform(),
        "cpus": __import__("os").cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"storescp: {out['storescp_images_per_s']} images/s   rtprop: {out['rtprop_images_per_s']} images/s   "
          f"ratio {out['ratio']}x   ({a.out})")


if __name__ == "__main__":
    main()
