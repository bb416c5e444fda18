"""Appendix tables from metrics files: a CSV of the reproduced numbers and a Markdown rendering that puts
the paper's numbers beside them.

A table spec (from the workflow config) names its rows and the method behind each, its columns (splits) and
optional reference rows that frame the paper's rows (the oracle, the base model)::

    {"name": "table1", "dataset": "embedded", "rows": {"J=50": "cross_pair_j50", ...},
     "reference": {"FullyOracle": "oracle"}, "columns": ["split1", ...], "seeds": [0, 1, 2]}

Metrics files are ``results/{dataset}/metrics/{method}/{split}/seed{seed}.json``, one per replicate. The
reproduced value is the novel-class mIoU, the paper's metric, averaged over the seeds; with several seeds the CSV
and the Markdown also give the standard deviation across them (of each cell, and of each row's mean over the
splits). The Markdown also lists base mIoU and hIoU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from weakshot.io_utils import atomic_path, read_yaml, write_text

# The datasets whose numbers the paper reports; for any other the paper's column is reference only.
PAPER_DATASET = "coco_stuff_10k"


def metrics_path(metrics_dir: Path, method: str, split: str, seed: int) -> Path:
    return Path(metrics_dir) / method / split / f"seed{seed}.json"


def table_seeds(spec: dict) -> list[int]:
    seeds = list(spec.get("seeds", [0]))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"table {spec.get('name')!r}: 'seeds' must be a non-empty list of distinct seeds, got {seeds}")
    return seeds


def all_rows(spec: dict) -> dict[str, str]:
    return {**spec["rows"], **spec.get("reference", {})}


def collect(spec: dict, metrics_dir: Path) -> pd.DataFrame:
    """Long table: one row per (table row, split, seed) with novel/base/all mIoU and hIoU."""
    records = []
    for row, method in all_rows(spec).items():
        for split in spec["columns"]:
            for seed in table_seeds(spec):
                path = metrics_path(metrics_dir, method, split, seed)
                try:
                    metrics = json.loads(path.read_text())
                except FileNotFoundError:
                    message = f"{path}: metrics of {method!r} on {split}, seed {seed} not found"
                    raise FileNotFoundError(message) from None
                records.append(
                    {
                        "row": row,
                        "method": method,
                        "split": split,
                        "seed": seed,
                        "novel_mIoU": metrics["novel_mIoU"],
                        "base_mIoU": metrics["base_mIoU"],
                        "mIoU": metrics["mIoU"],
                        "hIoU": metrics["hIoU"],
                    }
                )
    return pd.DataFrame.from_records(records)


def _per_seed(long: pd.DataFrame, value: str, spec: dict) -> pd.DataFrame:
    """(row, seed) by splits, plus each replicate's mean over the splits."""
    table = long.pivot_table(index=["row", "seed"], columns="split", values=value, aggfunc="first")
    table = table.reindex(columns=list(spec["columns"]))
    table["mean"] = table.mean(axis=1)
    return table


def wide(long: pd.DataFrame, value: str, spec: dict) -> pd.DataFrame:
    """Rows by splits (and their mean): the mean over the seeds."""
    table = _per_seed(long, value, spec).groupby(level="row").mean()
    table = table.reindex(index=list(all_rows(spec)))
    table.index.name = "row"
    return table


def spread(long: pd.DataFrame, value: str, spec: dict) -> pd.DataFrame | None:
    """Rows by splits (and mean): the sample standard deviation across seeds; None with a single seed. The
    ``mean`` column is the deviation of the replicates' split means, i.e. of a row's headline number."""
    if len(table_seeds(spec)) < 2:
        return None
    table = _per_seed(long, value, spec).groupby(level="row").std(ddof=1)
    table = table.reindex(index=list(all_rows(spec)))
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


def _fmt(value: float | None, row: str = "", sd: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.2f}" if row in RATIO_ROWS else f"{value:.1f}"
    if sd is not None and not math.isnan(sd):
        text += f" ± {sd:.1f}"
    return text


def _sd(novel_sd: pd.DataFrame | None, row: str, column: str) -> float | None:
    if novel_sd is None or row not in novel_sd.index:
        return None
    return float(novel_sd.loc[row, column])


def markdown(
    spec: dict,
    novel: pd.DataFrame,
    long: pd.DataFrame,
    paper: pd.DataFrame | None,
    caption: str,
    novel_sd: pd.DataFrame | None = None,
) -> str:
    reproduced_on_paper_data = spec["dataset"] == PAPER_DATASET
    lines = [f"## {spec['name'].capitalize()}: {caption}", ""]
    seeds = table_seeds(spec)
    if len(seeds) > 1:
        lines += [
            f"Ours: mean ± standard deviation over {len(seeds)} training seeds ({', '.join(map(str, seeds))}); "
            "the deviation of `mean` is that of the replicates' means over the splits.",
            "",
        ]
    else:
        lines += [f"Ours: one training seed ({seeds[0]}); set `seeds` in the config for mean ± sd over several.", ""]
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
            cells = [
                f"{_fmt(novel.loc[row, c], row, _sd(novel_sd, row, c))} | {_fmt(paper.loc[row, c], row)}"
                for c in novel.columns
            ]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += ["", f"ours = this pipeline on `{spec['dataset']}`; {label} = the appendix."]
    else:
        lines += ["| novel mIoU (%) | " + " | ".join(novel.columns) + " |", "|---|" + "---:|" * len(novel.columns)]
        for row in novel.index:
            cells = [_fmt(novel.loc[row, c], row, _sd(novel_sd, row, c)) for c in novel.columns]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
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


def plot_against_novel_ratio(table: pd.DataFrame, out_png: Path, title: str, sd: pd.DataFrame | None = None) -> None:
    """Novel mIoU of every method row against the splits' novel ratio (Table 3's plot); with ``sd`` (several
    seeds) each point carries an error bar of one standard deviation across the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if c != "mean"]
    ratio = table.loc["novel ratio", columns].astype(float)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=150)
    for row in table.index:
        if row in RATIO_ROWS:
            continue
        errors = sd.loc[row, columns].astype(float) if sd is not None and row in sd.index else None
        ax.errorbar(ratio, table.loc[row, columns].astype(float), yerr=errors, marker="o", capsize=3, label=row)
    ax.set_xlabel("novel ratio (share of classes that are novel)")
    seeds = "" if sd is None else " (mean ± sd over seeds)"
    ax.set_ylabel(f"novel-class mIoU (%){seeds}")
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
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Write the CSV and the Markdown rendering; return the novel mIoU table and its deviations across seeds
    (None with one seed).

    The CSV has a row per table row (with ``splits_dir`` first the splits' base and novel ratios, as Table 3)
    and a column per split plus ``mean``: the novel mIoU averaged over the seeds; with several seeds, a
    ``<column> sd`` column after each of them.
    """
    long = collect(spec, metrics_dir)
    novel = wide(long, "novel_mIoU", spec)
    novel_sd = spread(long, "novel_mIoU", spec)
    if splits_dir is not None:
        novel = pd.concat([split_ratios(splits_dir, list(spec["columns"])), novel])
        novel.index.name = "row"
    paper_all = read_yaml(paper_tables)
    paper = paper_rows(paper_all, spec)
    caption = paper_all.get(spec["name"], {}).get("caption", spec["name"])
    csv = novel
    if novel_sd is not None:
        columns = {c: novel[c] for c in novel.columns} | {f"{c} sd": novel_sd[c] for c in novel_sd.columns}
        csv = pd.concat(columns, axis=1)
        csv = csv[[name for c in novel.columns for name in (c, f"{c} sd")]]
        csv.index.name = "row"
    with atomic_path(out_csv) as tmp:
        csv.round(2).to_csv(tmp)
    write_text(out_md, markdown(spec, novel, long, paper, caption, novel_sd))
    return novel, novel_sd
