"""Appendix tables from metrics files: a CSV of the reproduced numbers and a Markdown rendering that puts
the paper's numbers beside them.

A table spec (from the workflow config) names its rows and the method behind each, its columns (splits) and
optional reference rows that frame the paper's rows (the oracle, the base model)::

    {"name": "table1", "dataset": "embedded", "rows": {"J=50": "cross_pair_j50", ...},
     "reference": {"FullyOracle": "oracle"}, "columns": ["split1", ...]}

Metrics files are ``results/{dataset}/metrics/{method}/{split}.json``. The reproduced value is the novel-class
mIoU, the paper's metric; the Markdown also lists base mIoU and hIoU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from weakshot.io_utils import atomic_path, read_yaml, write_text

# The datasets whose numbers the paper reports; for any other the paper's column is reference only.
PAPER_DATASET = "coco_stuff_10k"


def metrics_path(metrics_dir: Path, method: str, split: str) -> Path:
    return Path(metrics_dir) / method / f"{split}.json"


def all_rows(spec: dict) -> dict[str, str]:
    return {**spec["rows"], **spec.get("reference", {})}


def collect(spec: dict, metrics_dir: Path) -> pd.DataFrame:
    """Long table: one row per (table row, split) with novel/base/all mIoU and hIoU."""
    records = []
    for row, method in all_rows(spec).items():
        for split in spec["columns"]:
            path = metrics_path(metrics_dir, method, split)
            try:
                metrics = json.loads(path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: metrics of {method!r} on {split} not found") from None
            records.append(
                {
                    "row": row,
                    "method": method,
                    "split": split,
                    "novel_mIoU": metrics["novel_mIoU"],
                    "base_mIoU": metrics["base_mIoU"],
                    "mIoU": metrics["mIoU"],
                    "hIoU": metrics["hIoU"],
                }
            )
    return pd.DataFrame.from_records(records)


def wide(long: pd.DataFrame, value: str, spec: dict) -> pd.DataFrame:
    table = long.pivot(index="row", columns="split", values=value)
    table = table.reindex(index=list(all_rows(spec)), columns=list(spec["columns"]))
    table["mean"] = table.mean(axis=1)
    table.index.name = "row"
    return table


def paper_rows(paper: dict, spec: dict) -> pd.DataFrame | None:
    """The paper's numbers for this table, aligned to our rows and columns (None if the paper has none)."""
    entry = paper.get(spec["name"])
    if not entry:
        return None
    frame = pd.DataFrame(entry["rows"], index=entry["columns"]).T
    frame = frame.reindex(index=list(all_rows(spec)), columns=list(spec["columns"]))
    frame["mean"] = frame.mean(axis=1)
    return frame


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def markdown(spec: dict, novel: pd.DataFrame, long: pd.DataFrame, paper: pd.DataFrame | None, caption: str) -> str:
    reproduced_on_paper_data = spec["dataset"] == PAPER_DATASET
    lines = [f"## {spec['name'].capitalize()}: {caption}", ""]
    if paper is not None:
        label = "paper (COCO-Stuff-10K)"
        if not reproduced_on_paper_data:
            lines += [
                f"Reproduced on the **{spec['dataset']}** dataset; the paper's COCO-Stuff-10K numbers are shown "
                "as **reference only**: the datasets differ, so compare trends (orderings), not values.",
                "",
            ]
        header = "| novel mIoU (%) | " + " | ".join(f"{c} ours | {c} paper" for c in novel.columns) + " |"
        lines += [header, "|---|" + "---:|---:|" * len(novel.columns)]
        for row in novel.index:
            cells = [f"{_fmt(novel.loc[row, c])} | {_fmt(paper.loc[row, c])}" for c in novel.columns]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += ["", f"ours = this pipeline on `{spec['dataset']}`; {label} = the appendix."]
    else:
        lines += ["| novel mIoU (%) | " + " | ".join(novel.columns) + " |", "|---|" + "---:|" * len(novel.columns)]
        for row in novel.index:
            lines.append(f"| {row} | " + " | ".join(_fmt(novel.loc[row, c]) for c in novel.columns) + " |")
    lines += ["", "Base-class mIoU and harmonic mean hIoU of the reproduced models (%):", ""]
    base = wide(long, "base_mIoU", spec)
    hiou = wide(long, "hIoU", spec)
    lines += ["| row | " + " | ".join(f"{c} base / hIoU" for c in base.columns) + " |"]
    lines += ["|---|" + "---:|" * len(base.columns)]
    for row in base.index:
        cells = [f"{_fmt(base.loc[row, c])} / {_fmt(hiou.loc[row, c])}" for c in base.columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(spec: dict, metrics_dir: Path, paper_tables: Path, out_csv: Path, out_md: Path) -> pd.DataFrame:
    long = collect(spec, metrics_dir)
    novel = wide(long, "novel_mIoU", spec)
    paper_all = read_yaml(paper_tables)
    paper = paper_rows(paper_all, spec)
    caption = paper_all.get(spec["name"], {}).get("caption", spec["name"])
    with atomic_path(out_csv) as tmp:
        novel.round(2).to_csv(tmp)
    write_text(out_md, markdown(spec, novel, long, paper, caption))
    return novel
