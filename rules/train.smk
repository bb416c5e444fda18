# Training stage: FullyOracle (once per dataset, every class), the base model of each split (base classes
# only: base-model pretraining) and the weak-shot models of each split (SimFormer variants). One loop for
# all: `python -m weakshot train`, workflow/weakshot/engine/train.py. A killed job resumes from
# checkpoint.pt in its model folder when the rule runs again.


rule train:
    input:
        unpack(train_inputs),
        prepared="results/{dataset}/prepared",
    output:
        model="results/{dataset}/models/{method}/{split}/model.pt",
        config="results/{dataset}/models/{method}/{split}/config.yaml",
    log:
        "logs/{dataset}/train/{method}_{split}.log",
    benchmark:
        "benchmarks/{dataset}/train/{method}_{split}.tsv"
    wildcard_constraints:
        method=one_of(SPLIT_METHODS),
    conda:
        "../envs/weakshot.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1,
    params:
        run=run_config,
        out_dir=subpath(output.model, parent=True),
        split_args=split_args,
    shell:
        "python -m weakshot train --run-config {params.run:q} --prepared {input.prepared}"
        " {params.split_args} --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"


# Models trained once per dataset (FullyOracle; the CAM classifier of the baselines): the same job without a
# split or an initial model.
use rule train as train_dataset_model with:
    input:
        unpack(dataset_model_inputs),
        prepared="results/{dataset}/prepared",
    output:
        model="results/{dataset}/models/{method}/model.pt",
        config="results/{dataset}/models/{method}/config.yaml",
    log:
        "logs/{dataset}/train/{method}.log",
    benchmark:
        "benchmarks/{dataset}/train/{method}.tsv"
    wildcard_constraints:
        method=one_of(DATASET_METHODS),
    params:
        run=run_config,
        out_dir=subpath(output.model, parent=True),
        split_args="",
