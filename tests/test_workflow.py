"""The Snakemake workflow itself: lint, format, dry runs of the whole DAG and a real run on tiny data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from workflow_copy import copy_workflow

from weakshot.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def snakemake(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    # Jobs call `python`: make it this interpreter even when its venv is not activated.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True, timeout=1200, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    lines = dry_run_output.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow, so runs never touch the checkout's results/."""
    return copy_workflow(tmp_path)


def test_lint_is_clean():
    result = snakemake("--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["ruff-check", "ruff-format"])
def test_python_code_is_ruff_clean(command):
    # The settings are pyproject.toml's [tool.ruff]: line length 120, pyflakes, pycodestyle, isort, bugbear.
    result = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_of_the_default_target(workdir):
    counts = job_counts(snakemake("-n", cwd=workdir).stdout)
    # Embedded default: one dataset drawn, extracted and prepared; nine splits with their image labels.
    assert counts["generate_embedded"] == 1 and "download" not in counts
    assert counts["prepare"] == 1
    assert counts["split"] == 9 and counts["split_image_labels"] == 9
    # Per dataset: the oracle and the CAM classifier (RETAB's CAMs), trained once; only the oracle is evaluated.
    assert counts["train_dataset_model"] == 2 and counts["predict_dataset_model"] == 1
    # Tables 1-2 on Splits 1-4: Basic, Self-Pair and Cross-Pair with three J (the base model is not a row).
    # Table 3 on Splits 4-9: SimFormer (Cross-Pair; Split 4 is shared with Tables 1-2), its pseudo-labels and
    # SimFormer*, RETAB's network, pseudo-labels and RETAB*.
    # Figures 1-2 (Splits 4 and 9) add the WSSS baseline: CAM pseudo-labels and their retrain.
    tables_1_2, table_3, figures = 5 * 4, 5 + 6 + 6 + 6, 2
    assert counts["train"] == tables_1_2 + table_3 + figures
    assert counts["predict"] == tables_1_2 + 5 + 6 + 6 + figures
    assert counts["cam_pseudo_labels"] == 2 and counts["figure"] == 2
    assert counts["pseudo_labels"] == 6 and counts["retab_pseudo_labels"] == 6
    # Scored: 6 rows x 4 splits, then 4 rows x 6 splits less Cross-Pair and the oracle on Split 4.
    assert counts["evaluate"] == 6 * 4 + 4 * 6 - 2
    assert "models/base_model/" not in snakemake("-n", "-p", cwd=workdir).stdout  # not a row of any table
    assert counts["table"] == 2 and counts["table3"] == 1 and counts["report"] == 1


def test_dry_run_with_replicate_seeds(workdir):
    """Two seeds: every model of the tables twice (each retrain on the pseudo-labels of its own seed's model);
    the figures show the first seed only."""
    one = job_counts(snakemake("-n", "results/table3.csv", cwd=workdir).stdout)
    two = snakemake("-n", "-p", "results/table3.csv", "--config", "seeds=[0, 1]", cwd=workdir).stdout
    counts = job_counts(two)
    for rule in ("train", "train_dataset_model", "predict", "pseudo_labels", "retab_pseudo_labels", "evaluate"):
        assert counts[rule] == 2 * one[rule], rule
    assert "results/embedded/pseudo_labels/cross_pair/split6/seed1 " in two
    assert "--pseudo-labels results/embedded/pseudo_labels/cross_pair/split6/seed1 " in two
    seeds = {json.loads(part.split("'")[0])["train"]["seed"] for part in two.split("--run-config '")[1:]}
    assert seeds == {0, 1}
    figures = job_counts(snakemake("-n", "results/figure1.png", "--config", "seeds=[3, 1]", cwd=workdir).stdout)
    # Seed 3 only: SimFormer, the WSSS baseline's and RETAB's retrains, RETAB's net; the CAM classifier.
    assert figures["train"] == 4 and figures["train_dataset_model"] == 1


def test_dry_run_of_the_real_datasets(workdir):
    counts = job_counts(
        snakemake(
            "-n",
            "results/coco_stuff_10k/splits/split9_image_labels.tsv",
            "results/ade20k/splits/split4_image_labels.tsv",
            cwd=workdir,
        ).stdout
    )
    assert counts["download"] == 2 and "generate_embedded" not in counts
    assert counts["prepare"] == 2 and counts["split"] == 2


# Runs `snakemake` in-process with torch made unimportable: building the DAG must not need it.
NO_TORCH_SNAKEMAKE = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported while the DAG is built")
sys.meta_path.insert(0, NoTorch())
from snakemake.cli import main
sys.argv = ["snakemake", *sys.argv[1:]]
main()
"""


def paper_dry_run(workdir: Path, configfile: str, *targets: str) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SNAKEMAKE, "-n", *targets, "--configfile", configfile],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch imported" not in result.stdout + result.stderr
    return job_counts(result.stdout)


def resolved_run_config(workdir, model: str, *configfiles: str) -> dict:
    """The `--run-config` a dry run would hand to `python -m weakshot train` for `model`."""
    extra = ["--configfile", *configfiles] if configfiles else []
    result = snakemake("-n", "-p", model, *extra, cwd=workdir)
    return json.loads(result.stdout.split("--run-config '")[1].split("'")[0])


def test_dry_run_of_the_paper_configs(workdir):
    """The complete paper DAG of each dataset config: every split's models, the ImageNet weights, both
    datasets (Figure 1 is COCO-Stuff-10K's, Figure 2 ADE20K's), and no torch import while it is built."""
    coco = paper_dry_run(workdir, "config/coco_stuff_10k.yaml")
    assert coco["download"] == 2 and coco["download_pretrained"] == 1 and "generate_embedded" not in coco
    assert coco["split"] == 9 + 1  # COCO-Stuff-10K Splits 1-9; ADE20K Split 1 for Figure 2
    # Tables 1-2 (5 models x Splits 1-4), Table 3 (SimFormer on Splits 5-9, RETAB's net, RETAB* and SimFormer*
    # on Splits 4-9), Figure 1 (WSSS baseline, RETAB's net and RETAB* on Split 1) and Figure 2 (all four on
    # ADE20K's Split 1).
    assert coco["train"] == 5 * 4 + (5 + 3 * 6) + 3 + 4
    assert coco["train_dataset_model"] == 3  # COCO's oracle and CAM classifier, ADE20K's CAM classifier
    assert coco["table"] == 2 and coco["table3"] == 1 and coco["figure"] == 2

    ade = paper_dry_run(workdir, "config/ade20k.yaml", "results/table3.csv")
    assert ade["split"] == 4 and ade["download"] == 1 and ade["download_pretrained"] == 1
    assert ade["train"] == 4 * 4 and ade["pseudo_labels"] == 4  # SimFormer, RETAB's net, RETAB*, SimFormer*

    # The resolved settings of one job: ADE20K's crop, schedule and loss weights on the paper-scale model.
    spec = resolved_run_config(workdir, "results/ade20k/models/cross_pair/split2/seed6/model.pt", "config/ade20k.yaml")
    assert spec["train"]["seed"] == 6  # SimFormer's seed, the paper configs' `seeds`
    assert spec["augment"]["crop_size"] == 512 and spec["train"]["iterations"] == 160000
    assert spec["loss"]["complementary_weight"] == 0.2 and spec["similarity"]["distill_weight"] == 0.5
    assert spec["train"]["batch_size"] == 4 and spec["model"]["backbone"]["depth"] == 50
    assert spec["model"]["backbone"]["blocks"] is None and spec["model"]["num_queries"] == 100
    assert not spec["model"]["query_features"] and not spec["model"]["masked_attention"]  # MaskFormer's decoder


def test_embedded_models_share_one_schedule_and_dataset_method_overrides_apply_to_one_method(workdir):
    models = "results/embedded/models/{}/seed0/model.pt"
    split_models = "results/embedded/models/{}/split4/seed0/model.pt"
    targets = [models.format("oracle"), split_models.format("cross_pair"), split_models.format("retab_retrain")]
    iterations = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["training"]["train"]["iterations"]
    assert {resolved_run_config(workdir, t)["train"]["iterations"] for t in targets} == {iterations}

    override = workdir / "config" / "oracle_override.yaml"
    override.write_text("datasets:\n  embedded:\n    methods:\n      oracle:\n        train: {iterations: 7}\n")
    assert resolved_run_config(workdir, targets[0], str(override))["train"]["iterations"] == 7
    assert resolved_run_config(workdir, targets[1], str(override))["train"]["iterations"] == iterations


EXPERIMENTS = sorted(path.name for path in (ROOT / "config" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_configs_resolve_to_valid_run_configs(workdir, experiment):
    """Every experiment laid over the default changes the settings a model trains with, and only into fields
    the train CLI accepts (a misspelt field would otherwise fail hours into a run, in its first job)."""
    model = "results/embedded/models/cross_pair/split4/seed0/model.pt"
    default = resolved_run_config(workdir, model)
    spec = resolved_run_config(workdir, model, f"config/experiments/{experiment}")
    assert spec != default
    run = RunConfig.from_dict(spec)
    assert run.train.iterations == spec["train"]["iterations"]


def test_the_warmup_experiment_warms_up_every_embedded_model(workdir):
    """It tests the previous default's zero-initialised queries, so it must switch the learned ones off."""
    experiment = "config/experiments/warmup_2000_steps.yaml"
    for model in ("oracle/seed0", "basic/split4/seed0", "retab_retrain/split9/seed0"):
        spec = resolved_run_config(workdir, f"results/embedded/models/{model}/model.pt", experiment)
        run = RunConfig.from_dict(spec)
        assert run.train.warmup_iters == 200 and run.train.iterations == 2000 and not run.model.query_features
    default = resolved_run_config(workdir, "results/embedded/models/oracle/seed0/model.pt")
    assert RunConfig.from_dict(default).train.warmup_iters == 0  # the default schedule has none


def test_config_errors_are_reported(workdir):
    bad = workdir / "config" / "bad.yaml"
    bad.write_text("dataset: nowhere\n")
    result = snakemake("-n", "--configfile", str(bad), cwd=workdir, check=False)
    assert result.returncode != 0
    assert "nowhere" in result.stdout + result.stderr

    bad.write_text("datasets:\n  embedded:\n    sourse: embedded\n")
    result = snakemake("-n", "--configfile", str(bad), cwd=workdir, check=False)
    assert result.returncode != 0
    assert "sourse" in result.stdout + result.stderr

    # The seed of a model comes from `seeds`; one set in a settings layer would be overridden silently.
    bad.write_text("methods:\n  oracle:\n    train: {seed: 3}\n")
    result = snakemake("-n", "--configfile", str(bad), cwd=workdir, check=False)
    assert result.returncode != 0
    assert "methods.oracle.train.seed" in result.stdout + result.stderr

    bad.write_text("seeds: [1, 1]\n")
    result = snakemake("-n", "--configfile", str(bad), cwd=workdir, check=False)
    assert result.returncode != 0
    assert "seeds" in result.stdout + result.stderr


@pytest.mark.slow
def test_embedded_dataset_to_split9(workdir):
    """The README's first target, on the tiny test config: generate, extract, prepare, split."""
    # Targets first: --configfile takes several values and would swallow them.
    snakemake(
        "results/embedded/splits/split9.yaml", "results/embedded/splits/split9_image_labels.tsv",
        "--cores", "2", "--configfile", "config/test.yaml",
        cwd=workdir,
    )  # fmt: skip
    results = workdir / "results" / "embedded"
    train_pngs = sorted((results / "prepared" / "labels" / "train").glob("*.png"))
    test_pngs = sorted((results / "prepared" / "labels" / "test").glob("*.png"))
    assert len(train_pngs) == 48 and len(test_pngs) == 16
    assert len(list((results / "prepared" / "images" / "train").glob("*.jpg"))) == 48
    classes = yaml.safe_load((results / "prepared" / "classes.yaml").read_text())
    num_classes = len(classes["classes"])
    assert num_classes >= 40
    for png in train_pngs[:8]:
        values = set(np.unique(np.asarray(Image.open(png))).tolist())
        assert values <= set(range(num_classes)) | {255}

    split9 = yaml.safe_load((results / "splits" / "split9.yaml").read_text())
    assert len(split9["novel_ids"]) == int(num_classes * 0.5)
    rows = (results / "splits" / "split9_image_labels.tsv").read_text().splitlines()
    assert rows[0] == "image\tbase_ids\tnovel_ids" and len(rows) == 49
    # The extracted raw archive is an intermediate, removed once the prepared dataset exists.
    assert not (workdir / "resources" / "embedded" / "raw").exists()
    # Nothing left to do: a second run is a no-op.
    rerun = snakemake("results/embedded/splits/split9.yaml", "-n", "--configfile", "config/test.yaml", cwd=workdir)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr


@pytest.mark.slow
def test_tables_1_to_3_on_the_tiny_config(workdir):
    """Every stage of Tables 1-3 (oracle, base models, Basic / Self-Pair / Cross-Pair with three J, pseudo-labels,
    CAM classifier, RETAB, retraining) runs and the tables hold one number per row and split, with the paper's
    numbers beside them."""
    targets = ["results/table1.csv", "results/table2.csv", "results/table3.csv", "results/figure1.png",
               "results/figure2.png", "results/report.html",
               "results/embedded/metrics/base_model/split1/seed0.json"]  # fmt: skip
    # --configfile takes several files: it goes last, after the targets.
    snakemake(*targets, "--cores", "2", "--configfile", "config/test.yaml", cwd=workdir)
    for name, rows in [("table1", ["J=50", "J=100", "J=150"]), ("table2", ["Basic Model", "Self-Pair", "Cross-Pair"])]:
        csv = (workdir / "results" / f"{name}.csv").read_text().splitlines()
        assert csv[0] == "row,split1,mean"
        assert [line.split(",")[0] for line in csv[1:]] == rows + ["FullyOracle"]
        for line in csv[1:]:
            values = [float(v) for v in line.split(",")[1:]]
            assert all(0.0 <= v <= 100.0 for v in values)
        markdown = (workdir / "results" / f"{name}.md").read_text()
        assert "reference only" in markdown and "paper" in markdown
    model_dir = workdir / "results" / "embedded" / "models" / "cross_pair" / "split1" / "seed0"
    assert {"model.pt", "config.yaml", "train_log.jsonl", "simnet.pt"} <= {p.name for p in model_dir.iterdir()}
    assert not (model_dir / "checkpoint.pt").exists()
    resolved = yaml.safe_load((model_dir / "config.yaml").read_text())
    assert resolved["similarity"]["pairing"] == "cross" and resolved["method"]["init"] == "imagenet"

    table3 = (workdir / "results" / "table3.csv").read_text().splitlines()
    assert table3[0] == "row,split4,split5,mean"
    rows = {line.split(",")[0]: line.split(",")[1:] for line in table3[1:]}
    assert list(rows) == ["base ratio", "novel ratio", "RETAB*", "SimFormer", "SimFormer*", "FullyOracle"]
    for column, split in enumerate(["split4", "split5"]):
        record = yaml.safe_load((workdir / "results" / "embedded" / "splits" / f"{split}.yaml").read_text())
        assert float(rows["novel ratio"][column]) == pytest.approx(record["novel_ratio"], abs=0.005)  # CSV: 2 decimals
        assert float(rows["base ratio"][column]) == pytest.approx(1 - record["novel_ratio"], abs=0.005)
    assert float(rows["novel ratio"][0]) < float(rows["novel ratio"][1])
    assert (workdir / "results" / "table3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for figure in ("figure1", "figure2"):
        with Image.open(workdir / "results" / f"{figure}.png") as png:
            assert png.format == "PNG" and png.size[0] > png.size[1]  # 6 columns by 2 rows
        assert "rows" in (workdir / "logs" / "figures" / f"{figure}.log").read_text()
    # The report is a target of the run itself (rule report), built from the tiny config it ran with.
    html = (workdir / "results" / "report.html").read_text()
    assert "<html" in html.lower() and "table3" in html and "figure2" in html
    for source in ("cam", "retab", "cross_pair"):
        report_path = workdir / "results" / "embedded" / "pseudo_labels" / source / "split4" / "seed0.json"
        report = json.loads(report_path.read_text())
        assert report["num_images"] == 48 and report["split"] == "split4"
