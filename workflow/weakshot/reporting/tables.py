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
    if "novel_ratio" in entry:  # Table 3 states the splits' ratios too
        ratios = pd.DataFrame(
            {"base ratio": entry["base_ratio"], "novel ratio": entry["novel_ratio"]}, index=entry["columns"]
        ).T.reindex(columns=list(spec["columns"]))
        frame = pd.concat([ratios, frame])
    return frame


RATIO_ROWS = ("base ratio", "novel ratio")


def _fmt(value: float | None, row: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if row in RATIO_ROWS else f"{value:.1f}"


def markdown(spec: dict, novel: pd.DataFrame, long: pd.DataFrame, paper: pd.DataFrame | None, caption: str) -> str:
    reproduced_on_paper_data = spec["dataset"] == PAPER_DATASET
    lines = [f"## {spec['name'].capitalize()}: {caption}", ""]
    if paper is not None:
        paper = paper.reindex(index=novel.index)
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
            cells = [f"{_fmt(novel.loc[row, c], row)} | {_fmt(paper.loc[row, c], row)}" for c in novel.columns]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += ["", f"ours = this pipeline on `{spec['dataset']}`; {label} = the appendix."]
    else:
        lines += ["| novel mIoU (%) | " + " | ".join(novel.columns) + " |", "|---|" + "---:|" * len(novel.columns)]
        for row in novel.index:
            lines.append(f"| {row} | " + " | ".join(_fmt(novel.loc[row, c], row) for c in novel.columns) + " |")
    lines += ["", "Base-class mIoU and harmonic mean hIoU of the reproduced models (%):", ""]
    base = wide(long, "base_mIoU", spec)
    hiou = wide(long, "hIoU", spec)
    lines += ["| row | " + " | ".join(f"{c} base / hIoU" for c in base.columns) + " |"]
    lines += ["|---|" + "---:|" * len(base.columns)]
    for row in base.index:
        cells = [f"{_fmt(base.loc[row, c])} / {_fmt(hiou.loc[row, c])}" for c in base.columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def split_ratios(splits_dir: Path, columns: list[str]) -> pd.DataFrame:
    """Base and novel class ratio of each split (rows "base ratio", "novel ratio"), from the split files."""
    ratios = {}
    for split in columns:
        path = Path(splits_dir) / f"{split}.yaml"
        record = read_yaml(path)
        if not isinstance(record, dict) or "novel_ratio" not in record:
            raise ValueError(f"{path}: split file lacks the key 'novel_ratio'")
        ratios[split] = {"base ratio": 1 - float(record["novel_ratio"]), "novel ratio": float(record["novel_ratio"])}
    frame = pd.DataFrame(ratios)
    frame["mean"] = float("nan")
    return frame


def plot_against_novel_ratio(table: pd.DataFrame, out_png: Path, title: str) -> None:
    """Novel mIoU of every method row against the splits' novel ratio (Table 3's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if c != "mean"]
    ratio = table.loc["novel ratio", columns].astype(float)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=150)
    for row in table.index:
        if row in RATIO_ROWS:
            continue
        ax.plot(ratio, table.loc[row, columns].astype(float), marker="o", label=row)
    ax.set_xlabel("novel ratio (share of classes that are novel)")
    ax.set_ylabel("novel-class mIoU (%)")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(list(ratio), [f"{r:.2f}\n{c}" for r, c in zip(ratio, columns)], fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_table(
    spec: dict, metrics_dir: Path, paper_tables: Path, out_csv: Path, out_md: Path, splits_dir: Path | None = None
) -> pd.DataFrame:
    """Write the CSV (novel mIoU; with ``splits_dir`` also the splits' base and novel ratios, as Table 3) and the
    Markdown rendering."""
    long = collect(spec, metrics_dir)
    novel = wide(long, "novel_mIoU", spec)
    if splits_dir is not None:
        novel = pd.concat([split_ratios(splits_dir, list(spec["columns"])), novel])
        novel.index.name = "row"
    paper_all = read_yaml(paper_tables)
    paper = paper_rows(paper_all, spec)
    caption = paper_all.get(spec["name"], {}).get("caption", spec["name"])
    with atomic_path(out_csv) as tmp:
        novel.round(2).to_csv(tmp)
    write_text(out_md, markdown(spec, novel, long, paper, caption))
    return novel
