"""How much a click must fix for box + 5 clicks to reach a target (a benchmark, not a test).

The CVPR 2025 interactive-3D protocol of `bench/quality.py --prompt boxclicks` (the box's result, then
clicks at the deepest point of the largest 3D error), with each click replaced by a perfect
correction of a known size: the reference copied onto the clicked slice and the k slices on each
side (--k 0,2,5), nothing else. Mean Dice after each click: what the engine's corrections are
measured against (k = 0 is a perfect outline on each clicked slice, carried nowhere).

    nice -n 10 .venv/bin/python bench/click_bound.py [--cases shared|totalseg512] [--k 0,2,5] [--clicks 5]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from config.schema import PropagationConfig
from models.propagate import propagate
from pipeline.metrics import dice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402
    DEFAULT_DATA,
    REPO,
    error_click,
    make_prompts,
    sts_cases,
    totalseg512_cases,
    totalseg_cases,
)


def perfect_clicks(case: dict, base: np.ndarray, k: int, clicks: int) -> list[float]:
    """Dice of `base`, then after each protocol click that copies the reference onto its slice +- k."""
    reference, predicted, taken = case["mask"], base.copy(), set()
    scores = [dice(predicted, reference)]
    for _ in range(clicks):
        click = error_click(predicted, reference, case["spacing"], taken)
        if click is not None:
            z = click.slice_index
            predicted[max(0, z - k):z + k + 1] = reference[max(0, z - k):z + k + 1]
        scores.append(dice(predicted, reference))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--cases", choices=["shared", "totalseg512"], default="shared")
    parser.add_argument("--k", default="0,2,5", help="slices on each side a perfect click fixes (default 0,2,5)")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    cases = (totalseg_cases(args.data) + sts_cases(args.data) if args.cases == "shared"
             else totalseg512_cases(args.data))
    ks = [int(k) for k in args.k.split(",")]
    settings = PropagationConfig(backend="classic")
    rows = []
    for case in cases:
        prompts = make_prompts(case["mask"], "box", case["spacing"][1:])
        base = propagate(case["image"], case["spacing"], prompts, case["modality"], settings).mask
        row = {"structure": case["name"], **{f"k{k}": perfect_clicks(case, base, k, args.clicks) for k in ks}}
        rows.append(row)
        print(f"{case['name']:24s} " + "  ".join(f"k={k}: {row[f'k{k}'][-1]:.3f}" for k in ks), flush=True)
    summary = {f"k{k}": [float(v) for v in np.mean([r[f"k{k}"] for r in rows], axis=0)] for k in ks}
    for k in ks:
        print(f"MEAN k={k}: after each click " + " ".join(f"{v:.3f}" for v in summary[f"k{k}"]))
    out = args.out or REPO / "bench" / "results" / f"click_bound{'' if args.cases == 'shared' else '_' + args.cases}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": args.cases, "summary": summary, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
