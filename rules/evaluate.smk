# Evaluation stage: predict the test images with a trained model (a COCO stuff-segmentation result file) and
# score it against the test labels of a split (novel, base, all mIoU and hIoU in a small JSON).


rule predict:
    input:
        model="results/{dataset}/models/{method}/{split}/seed{seed}/model.pt",
        prepared="results/{dataset}/prepared",
    output:
        "results/{dataset}/predictions/{method}/{split}/seed{seed}.json",
    log:
        "logs/{dataset}/predict/{method}_{split}_seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/predict/{method}_{split}_seed{seed}.tsv"
    wildcard_constraints:
        method=one_of(SPLIT_METHODS),
    conda:
        "../envs/weakshot.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        model_dir=subpath(input.model, parent=True),
    shell:
        "python -m weakshot predict --model {params.model_dir} --images {input.prepared}/images/test"
        " --classes {input.prepared}/classes.yaml --out {output} --threads {threads} > {log} 2>&1"


# Per-dataset models (FullyOracle) are predicted once and scored on every split.
use rule predict as predict_dataset_model with:
    input:
        model="results/{dataset}/models/{method}/seed{seed}/model.pt",
        prepared="results/{dataset}/prepared",
    output:
        "results/{dataset}/predictions/{method}/seed{seed}.json",
    log:
        "logs/{dataset}/predict/{method}_seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/predict/{method}_seed{seed}.tsv"
    wildcard_constraints:
        method=one_of(DATASET_METHODS),


rule evaluate:
    input:
        predictions=predictions_of,
        prepared="results/{dataset}/prepared",
        split="results/{dataset}/splits/{split}.yaml",
    output:
        "results/{dataset}/metrics/{method}/{split}/seed{seed}.json",
    log:
        "logs/{dataset}/evaluate/{method}_{split}_seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/evaluate/{method}_{split}_seed{seed}.tsv"
    conda:
        "../envs/weakshot.yaml"
    resources:
        mem_mb=2000,
        runtime=lambda wildcards, attempt: 30 * attempt,
    shell:
        "python -m weakshot evaluate --predictions {input.predictions}"
        " --labels {input.prepared}/labels/test --classes {input.prepared}/classes.yaml"
        " --split {input.split} --out {output} > {log} 2>&1"
