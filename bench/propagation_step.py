"""Where one slice-to-slice step of the classic propagator loses (a diagnostic, not a test).

For every pair of neighbouring slices of each bench/quality.py case, the reference's own mask on
one slice is carried to the other by one propagation step (`models.classic._Chain.step`), with the
intensity model a key slice there would give (the mask vs the ring around it). After each stage
(the mask copied unchanged, shifted by the patch match, registered by demons, refined by the
intensity model, opened), Dice and log(area / reference area) against the reference on the other
slice. A perfect step would give Dice 1 and log-area 0; a chain compounds each step's loss.

    .venv/bin/python bench/propagation_step.py [--data ../shared/data] [--only totalseg_label5,...]
                                               [--out bench/results/propagation_step.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from config.schema import PropagationConfig
from models.classic import _Chain
from models.intensity_model import histogram, ring_around, slice_features
from pipeline.metrics import dice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULT_DATA, REPO, grouped, sts_cases, totalseg_cases  # noqa: E402

STAGES = ("copied", "shifted", "registered", "refined", "opened")


def case_steps(case: dict, settings: PropagationConfig) -> list[dict]:
    """One row per (slice, neighbour) pair of the reference: Dice and log-area after each stage."""
    mask, spacing = case["mask"], case["spacing"]
    features = slice_features(case["image"], case["modality"])
    chain = _Chain(features, mask.shape[0], float(spacing[0]), tuple(spacing[1:]), settings)
    slices = set(np.flatnonzero(mask.any(axis=(1, 2))).tolist())
    rows = []
    for z0 in sorted(slices):
        ring = ring_around(mask[z0], spacing[1:])
        fg, bg = histogram(features(z0)[mask[z0]]), histogram(features(z0)[ring])
        for direction in (1, -1):
            z = z0 + direction
            if z not in slices:
                continue
            stages = {"copied": mask[z0]}
            chain.step(mask[z0], z, direction, fg, bg, stages)
            reference = mask[z]
            row = {"structure": case["name"], "from": int(z0), "to": int(z)}
            for name in STAGES:
                if name in stages:
                    got = stages[name]
                    row[name] = {"dice": dice(got, reference),
                                 "log_area": float(np.log(max(int(got.sum()), 1) / int(reference.sum())))}
            rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per group of cases and stage: mean Dice, mean and median log-area ratio, number of steps."""
    summary = {}
    for group, chosen in grouped(rows):
        summary[group] = {"steps": len(chosen)}
        for name in STAGES:
            values = [r[name] for r in chosen if name in r]
            if values:
                log_area = [v["log_area"] for v in values]
                summary[group][name] = {"dice": float(np.mean([v["dice"] for v in values])),
                                        "log_area_mean": float(np.mean(log_area)),
                                        "log_area_median": float(np.median(log_area))}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--only", default="", help="comma-separated structure names to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "propagation_step.json")
    args = parser.parse_args(argv)

    settings = PropagationConfig(backend="classic")
    cases = totalseg_cases(args.data) + sts_cases(args.data)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c["name"] in wanted]
    rows = []
    for case in cases:
        for row in case_steps(case, settings):
            row["modality"] = case["modality"]
            rows.append(row)
    summary = summarise(rows)
    print(f"{'group':8s} {'steps':>5s}  " + "  ".join(f"{name:>21s}" for name in STAGES))
    print(f"{'':8s} {'':5s}  " + "  ".join(f"{'Dice log-area mean/med':>21s}" for _ in STAGES))
    for group, s in summary.items():
        cells = [f"{s[n]['dice']:5.3f} {s[n]['log_area_mean']:+6.3f}/{s[n]['log_area_median']:+6.3f}"
                 if n in s else f"{'-':>21s}" for n in STAGES]
        print(f"{group:8s} {s['steps']:5d}  " + "  ".join(f"{c:>21s}" for c in cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    per_structure = {name: summarise([r for r in rows if r["structure"] == name])["all"]
                     for name in dict.fromkeys(r["structure"] for r in rows)}
    args.out.write_text(json.dumps({"method": settings.classic.method, "summary": summary,
                                    "structures": per_structure}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
