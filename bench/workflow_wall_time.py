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
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from workflow_copy import copy_workflow  # noqa: E402  (the tests' copy of the workflow: one list of its files)

PER_METHOD_STAGES = {"train", "predict", "evaluate", "pseudo_labels"}


def job_group(benchmark: Path) -> str:
    """``train:cross_pair`` for benchmarks/<dataset>/train/cross_pair_split4_seed0.tsv: the stage and the
    method, summed over splits and seeds; ``split`` for benchmarks/<dataset>/split_split4.tsv."""
    stem = re.sub(r"(_split\d+)?(_seed\d+)?$", "", benchmark.stem)
    return f"{benchmark.parent.name}:{stem}" if benchmark.parent.name in PER_METHOD_STAGES else stem


def job_times(benchmarks: Path) -> dict[str, list[tuple[float, float]]]:
    """(wall seconds, CPU seconds) of every job, by ``job_group``. Wall seconds grow when jobs share cores;
    CPU seconds are what the job itself used, so their sum is the floor of a run on fully busy cores."""
    per_rule: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for tsv in benchmarks.rglob("*.tsv"):
        with open(tsv) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        per_rule[job_group(tsv)].append((float(row["s"]), float(row["cpu_time"])))
    return per_rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+")
    parser.add_argument("--cores", type=int, default=4)
    parser.add_argument("--configfile", default=None)
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it")
    args = parser.parse_args()

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="weakshot-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    copy_workflow(workdir)
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

    per_rule = job_times(workdir / "benchmarks")
    cpus = os.cpu_count() or 1
    cpu_total = sum(cpu for values in per_rule.values() for _, cpu in values)
    print(f"{' '.join(args.targets)}: {wall / 60:.1f} min wall on {args.cores} cores ({cpus} CPUs)")
    print(f"CPU time of all jobs: {cpu_total:.0f} s = {cpu_total / cpus / 60:.1f} min of {cpus} fully busy CPUs")
    print("by rule (job wall-seconds, CPU-seconds, count):")
    for rule, values in sorted(per_rule.items(), key=lambda item: -sum(cpu for _, cpu in item[1]))[:15]:
        wall_sum, cpu_sum = sum(w for w, _ in values), sum(c for _, c in values)
        print(f"  {rule:32s} {wall_sum:8.0f} s {cpu_sum:8.0f} s  x{len(values)}")
    if args.keep is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
