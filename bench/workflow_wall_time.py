"""Wall time of DAG targets built from nothing, e.g. Tables 1-2 on the embedded default.

Copies the workflow into a fresh folder (so nothing already built is reused), runs
``snakemake --cores N <targets>`` there and prints the wall time and the slowest rules (from the
``benchmarks/`` TSVs Snakemake writes).

    python bench/workflow_wall_time.py results/table1.csv results/table2.csv [--cores 4] [--configfile F]
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+")
    parser.add_argument("--cores", type=int, default=4)
    parser.add_argument("--configfile", default=None)
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it")
    args = parser.parse_args()

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="weakshot-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ["Snakefile", "rules", "config", "envs", "profiles", "report", "workflow"]:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, workdir / name)
    command = [sys.executable, "-m", "snakemake", *args.targets, "--cores", str(args.cores)]
    if args.configfile:
        command += ["--configfile", args.configfile]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"snakemake failed after {wall:.0f} s (folder kept: {workdir})")

    per_rule: dict[str, list[float]] = collections.defaultdict(list)
    for tsv in (workdir / "benchmarks").rglob("*.tsv"):
        with open(tsv) as f:
            seconds = float(next(csv.DictReader(f, delimiter="\t"))["s"])
        rule = tsv.stem.split("_split")[0] if tsv.parent.name != "train" else "train:" + tsv.stem.rsplit("_", 1)[0]
        per_rule[rule].append(seconds)
    print(f"{' '.join(args.targets)}: {wall / 60:.1f} min wall on {args.cores} cores ({os.cpu_count()} CPUs)")
    print("job-seconds by rule (sum, count):")
    for rule, values in sorted(per_rule.items(), key=lambda item: -sum(item[1]))[:15]:
        print(f"  {rule:32s} {sum(values):8.0f} s  x{len(values)}")
    if args.keep is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
