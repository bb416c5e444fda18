# Weak-shot semantic segmentation (SimFormer, NeurIPS 2022) as a DAG. Each stage has one rule file under
# rules/, one CLI subcommand (`python -m weakshot <stage>`) and one module under workflow/weakshot/.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


validate(config, schema="config/schema/config.schema.yaml")


include: "rules/common.smk"


wildcard_constraints:
    dataset=one_of(list(config["datasets"])),
    split=r"split\d+",
    method=r"[a-z][a-z0-9_]*",
    seed=r"\d+",


include: "rules/data.smk"
include: "rules/splits.smk"
include: "rules/train.smk"
include: "rules/pseudo_labels.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
