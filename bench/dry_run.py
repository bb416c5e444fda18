"""How long `snakemake -n` takes to build the complete paper DAG, and its jobs per rule.

    python bench/dry_run.py [--configfile config/coco_stuff_10k.yaml config/ade20k.yaml] [--repeat 3]

Runs in the checkout (a dry run writes nothing but .snakemake metadata) and prints, per config, the
fastest of --repeat runs and the job counts of the default target.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job_counts(output: str) -> dict[str, int]:
    counts = {}
    for line in output.split("Job stats:")[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2:
            break
        counts[parts[0]] = int(parts[1])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", nargs="+", default=["config/coco_stuff_10k.yaml", "config/ade20k.yaml"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    for configfile in args.configfile:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-m", "snakemake", "-n", "--configfile", configfile],
                cwd=ROOT, env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            times.append(time.perf_counter() - start)
        counts = job_counts(result.stdout)
        print(f"{configfile}: dry run {min(times):.2f} s (best of {args.repeat}; all: "
              f"{', '.join(f'{t:.2f}' for t in times)}), {counts.pop('total')} jobs")  # fmt: skip
        for rule, count in sorted(counts.items(), key=lambda item: -item[1]):
            print(f"  {rule:24s} {count}")


if __name__ == "__main__":
    main()
