"""Novel mIoU over several seeds: mean ± sd per split and of the four-split mean, and paired comparisons.

Reads the metrics files of `weakshot evaluate` that a multi-seed run leaves, for example after

    snakemake --cores 4 --config 'seeds=[0,1,2]' \\
        results/embedded/metrics/{basic,self_pair,cross_pair}/split{1,2,3,4}/seed{0,1,2}.json \\
        results/embedded/metrics/oracle/split{1,2,3,4}/seed{0,1,2}.json

    python bench/seed_table.py --seeds 0 1 2 [--results results/embedded] [--rows basic self_pair cross_pair oracle]

and prints a Markdown table (the one under "Tables 1-2 on the embedded default" in the README), then, for each
pair of rows, in how many (seed, split) cells the first is above the second and by how much on average.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

LABELS = {"basic": "Basic Model", "self_pair": "Self-Pair", "cross_pair": "Cross-Pair", "oracle": "FullyOracle"}


def novel_miou(path: Path) -> float:
    if not path.is_file():
        raise SystemExit(f"{path}: metrics file not found (build it with snakemake first; see this script's help)")
    value = json.loads(path.read_text()).get("novel_mIoU")
    if value is None:
        raise SystemExit(f"{path}: 'novel_mIoU' is missing or null (was it evaluated with a split file?)")
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results/embedded"))
    parser.add_argument("--rows", nargs="+", default=list(LABELS))
    parser.add_argument("--splits", nargs="+", default=["split1", "split2", "split3", "split4"])
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds for a standard deviation")

    # values[row]: seeds x splits
    values = {
        row: np.array(
            [
                [novel_miou(args.results / "metrics" / row / split / f"seed{seed}.json") for split in args.splits]
                for seed in args.seeds
            ]
        )
        for row in args.rows
    }
    head = " | ".join(s.replace("split", "Split ") for s in args.splits)
    print(f"| novel mIoU (%) | {head} | mean | mean of each seed |")
    print("|---|" + "---:|" * (len(args.splits) + 1) + "---|")
    for row, v in values.items():
        cells = " | ".join(f"{v[:, i].mean():.1f} ± {v[:, i].std(ddof=1):.1f}" for i in range(v.shape[1]))
        means = v.mean(1)
        per_seed = " / ".join(f"{m:.1f}" for m in means)
        print(f"| {LABELS.get(row, row)} | {cells} | {means.mean():.1f} ± {means.std(ddof=1):.1f} | {per_seed} |")
    print()
    for a, b in itertools.permutations(args.rows, 2):
        diff = values[a] - values[b]
        per_seed = ", ".join(f"{d:+.1f}" for d in diff.mean(1))
        print(
            f"{a} - {b}: above in {(diff > 0).sum()} of {diff.size} cells, {diff.mean():+.1f} on average "
            f"(per seed {per_seed}), smallest {diff.min():+.1f}"
        )


if __name__ == "__main__":
    main()
