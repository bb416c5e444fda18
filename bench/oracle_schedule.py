"""What a training schedule buys: the oracle trained for several step counts and seeds, each scored on the test set.

Starts from the resolved run config the DAG saved beside a trained model (its ``config.yaml``), changes only the
iterations, the seed and any ``--set`` fields, and runs ``python -m weakshot train / predict / evaluate`` for each
(steps, seed), ``--jobs`` at a time with one thread each. After the default Tables 1-2 run:

    python bench/oracle_schedule.py --steps 500 600 750 1000 --seeds 0
    python bench/oracle_schedule.py --steps 500 --seeds 0 --set train.batch_size=16   # one run per --set

prints one row per run: training wall time, the mean class loss of the logged steps in the last fifth of the
schedule (the training-side measure; it needs no test image) and the test mIoU over all classes. The README's
"Choosing the schedule" table comes from it. Models go to ``--out`` (default: a new folder under /tmp).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SAVED_ONLY_KEYS = ("num_classes",)  # written beside the model for the record; not a run setting


def parse_value(text: str) -> object:
    """``--set`` values are YAML scalars: 0.002 -> float, 16 -> int, true -> bool, cce -> str."""
    return yaml.safe_load(text)


def run_config(saved: dict, steps: int, seed: int, overrides: dict[str, object]) -> dict:
    """The saved run config with ``train.iterations``, ``train.seed`` and each ``section.field`` override set.

    An override must name a field the saved config has, so that a typo fails here instead of in 20 trainings.
    """
    config = copy.deepcopy(saved)
    for key in SAVED_ONLY_KEYS:
        config.pop(key, None)
    config["train"]["iterations"] = steps
    config["train"]["seed"] = seed
    for dotted, value in overrides.items():
        *path, field = dotted.split(".")
        node = config
        for part in path:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"--set {dotted}: the run config has no section {part!r}")
            node = node[part]
        if field not in node:
            raise SystemExit(f"--set {dotted}: the run config has no field {field!r} (known: {', '.join(node)})")
        node[field] = value
    return config


def late_class_loss(train_log: Path, steps: int) -> float:
    """Mean ``loss_ce`` (final decoder layer) of the logged steps after 80 % of the schedule."""
    rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    late = [row["loss_ce"] for row in rows if row["iteration"] > 0.8 * steps]
    if not late:
        raise SystemExit(f"{train_log}: no logged step after 80 % of {steps} (lower train.log_every)")
    return sum(late) / len(late)


def train_and_score(config: dict, out: Path, prepared: Path, split: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, "-m", "weakshot"]

    def run(stage: str, *args: str) -> None:
        with open(out / f"{stage}.log", "w") as log:
            done = subprocess.run([*python, stage, *args], stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"{stage} failed (exit {done.returncode}); see {out / f'{stage}.log'}")

    start = time.perf_counter()
    run(
        "train",
        "--run-config",
        json.dumps(config),
        "--prepared",
        str(prepared),
        "--out-dir",
        str(out / "model"),
        "--threads",
        "1",
    )
    seconds = time.perf_counter() - start
    run(
        "predict",
        "--model",
        str(out / "model"),
        "--images",
        str(prepared / "images" / "test"),
        "--classes",
        str(prepared / "classes.yaml"),
        "--out",
        str(out / "predictions.json"),
        "--threads",
        "1",
    )
    run(
        "evaluate",
        "--predictions",
        str(out / "predictions.json"),
        "--labels",
        str(prepared / "labels" / "test"),
        "--classes",
        str(prepared / "classes.yaml"),
        "--split",
        str(split),
        "--out",
        str(out / "metrics.json"),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "train_s": seconds,
        "class_loss": late_class_loss(out / "model" / "train_log.jsonl", config["train"]["iterations"]),
        "mIoU": metrics["mIoU"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", type=Path, default=Path("results/embedded/models/oracle/seed0/config.yaml"))
    parser.add_argument("--prepared", type=Path, default=Path("results/embedded/prepared"))
    parser.add_argument("--split", type=Path, default=Path("results/embedded/splits/split4.yaml"))
    parser.add_argument("--steps", nargs="+", type=int, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (one thread each)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    for path in (args.model_config, args.prepared, args.split):
        if not path.exists():
            parser.error(f"{path} not found: build the default Tables 1-2 first (README quick start)")
    saved = yaml.safe_load(args.model_config.read_text())
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item}: expected SECTION.FIELD=VALUE")
        overrides[key] = parse_value(value)
    # Log often enough that the late class loss averages several steps, whatever the saved log_every.
    overrides.setdefault("train.log_every", 10)
    out = args.out or Path(tempfile.mkdtemp(prefix="oracle-schedule-"))

    runs = list(itertools.product(args.steps, args.seeds))
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            run: pool.submit(
                train_and_score,
                run_config(saved, run[0], run[1], overrides),
                out / f"steps{run[0]}_seed{run[1]}",
                args.prepared,
                args.split,
            )
            for run in runs
        }
        results = {run: future.result() for run, future in futures.items()}

    settings = ", ".join(f"{k}={v}" for k, v in overrides.items())
    print(f"oracle runs from {args.model_config} ({settings}; models under {out})")
    print("| steps | seed | training (s) | class loss, last 20 % | mIoU, all classes |")
    print("|---:|---:|---:|---:|---:|")
    for (steps, seed), result in results.items():
        print(f"| {steps} | {seed} | {result['train_s']:.0f} | {result['class_loss']:.2f} | {result['mIoU']:.1f} |")


if __name__ == "__main__":
    main()
