"""Appendix tables from metrics files: replicates (seeds) averaged, their spread reported, files named on error."""

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from weakshot.reporting.tables import plot_against_novel_ratio, write_table

SPEC = {
    "name": "table2",
    "dataset": "embedded",
    "rows": {"Basic Model": "basic", "Cross-Pair": "cross_pair"},
    "reference": {"FullyOracle": "oracle"},
    "columns": ["split1", "split2"],
}


def novel_value(method: str, split: str, seed: int) -> float:
    """A distinct, known novel mIoU per replicate."""
    return {"basic": 10.0, "cross_pair": 20.0, "oracle": 40.0}[method] + int(split[-1]) + 3.0 * seed


def write_metrics(metrics_dir: Path, seeds: list[int]) -> None:
    for method in ("basic", "cross_pair", "oracle"):
        for split in SPEC["columns"]:
            for seed in seeds:
                path = metrics_dir / method / split / f"seed{seed}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                value = novel_value(method, split, seed)
                path.write_text(json.dumps({"novel_mIoU": value, "base_mIoU": 50.0, "mIoU": 45.0, "hIoU": 30.0}))


@pytest.fixture
def paper(tmp_path: Path) -> Path:
    path = tmp_path / "paper.yaml"
    rows = {"Basic Model": [35.0, 36.0], "Cross-Pair": [38.0, 39.0]}
    path.write_text(yaml.safe_dump({"table2": {"caption": "pairing", "columns": ["split1", "split2"], "rows": rows}}))
    return path


def test_several_seeds_give_mean_and_sd(tmp_path, paper):
    seeds = [0, 1, 2]
    write_metrics(tmp_path / "metrics", seeds)
    out_csv, out_md = tmp_path / "t.csv", tmp_path / "t.md"
    novel, sd = write_table({**SPEC, "seeds": seeds}, tmp_path / "metrics", paper, out_csv, out_md)

    csv = pd.read_csv(out_csv, index_col="row")
    assert list(csv.columns) == ["split1", "split1 sd", "split2", "split2 sd", "mean", "mean sd"]
    for row, method in [("Basic Model", "basic"), ("Cross-Pair", "cross_pair"), ("FullyOracle", "oracle")]:
        for split in SPEC["columns"]:
            values = [novel_value(method, split, seed) for seed in seeds]
            assert csv.loc[row, split] == pytest.approx(statistics.mean(values))
            assert csv.loc[row, f"{split} sd"] == pytest.approx(statistics.stdev(values), abs=0.005)
        # The spread of a row's headline number: the replicates' means over the splits.
        split_means = [statistics.mean(novel_value(method, s, seed) for s in SPEC["columns"]) for seed in seeds]
        assert csv.loc[row, "mean"] == pytest.approx(statistics.mean(split_means))
        assert csv.loc[row, "mean sd"] == pytest.approx(statistics.stdev(split_means), abs=0.005)
    assert sd is not None and sd.loc["Cross-Pair", "split1"] == pytest.approx(3.0)

    markdown = out_md.read_text()
    assert "3 training seeds (0, 1, 2)" in markdown
    assert "| Cross-Pair | 24.0 ± 3.0 | 38.0 |" in markdown  # ours (mean ± sd) beside the paper's

    plot = tmp_path / "t.png"
    with_ratios = pd.concat([pd.DataFrame({"split1": [0.25], "split2": [0.5]}, index=["novel ratio"]), novel])
    plot_against_novel_ratio(with_ratios, plot, "t", sd)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_gives_plain_values(tmp_path, paper):
    write_metrics(tmp_path / "metrics", [4])
    out_csv, out_md = tmp_path / "t.csv", tmp_path / "t.md"
    _, sd = write_table({**SPEC, "seeds": [4]}, tmp_path / "metrics", paper, out_csv, out_md)
    assert sd is None
    csv = pd.read_csv(out_csv, index_col="row")
    assert list(csv.columns) == ["split1", "split2", "mean"]
    assert csv.loc["Basic Model", "split2"] == pytest.approx(novel_value("basic", "split2", 4))
    markdown = out_md.read_text()
    assert "one training seed (4)" in markdown and "| Basic Model | 23.0 | 35.0 |" in markdown


def test_a_missing_replicate_is_named(tmp_path, paper):
    write_metrics(tmp_path / "metrics", [0, 1])
    (tmp_path / "metrics" / "cross_pair" / "split2" / "seed1.json").unlink()
    out_csv = tmp_path / "t.csv"
    out_csv.write_text("finished,table\n")
    with pytest.raises(FileNotFoundError, match=r"cross_pair/split2/seed1\.json.*seed 1"):
        write_table({**SPEC, "seeds": [0, 1]}, tmp_path / "metrics", paper, out_csv, tmp_path / "t.md")
    assert out_csv.read_text() == "finished,table\n"  # an earlier result is left as it was


def test_repeated_seeds_are_rejected(tmp_path, paper):
    write_metrics(tmp_path / "metrics", [0])
    with pytest.raises(ValueError, match="distinct"):
        write_table({**SPEC, "seeds": [0, 0]}, tmp_path / "metrics", paper, tmp_path / "t.csv", tmp_path / "t.md")
