# Training stage: FullyOracle (once per dataset, every class), the base model of each split (base classes
# only: base-model pretraining) and the weak-shot models of each split (SimFormer variants). One loop for
# all: `python -m weakshot train`, workflow/weakshot/engine/train.py. A killed job resumes from
# checkpoint.pt in its model folder when the rule runs again. Every model is trained once per seed of
# `seeds` (replicates; the tables average them). A job given several GPUs (resource `gpu`, set
# in a profile) trains data-parallel on them: `--gpus` launches one torchrun worker per GPU.


rule train:
    input:
        unpack(train_inputs),
        prepared="results/{dataset}/prepared",
    output:
        model="results/{dataset}/models/{method}/{split}/seed{seed}/model.pt",
        config="results/{dataset}/models/{method}/{split}/seed{seed}/config.yaml",
    log:
        "logs/{dataset}/train/{method}_{split}_seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/train/{method}_{split}_seed{seed}.tsv"
    wildcard_constraints:
        method=one_of(SPLIT_METHODS),
    conda:
        "../envs/weakshot.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        # A retry resumes from checkpoint.pt, with more time.
        runtime=lambda wildcards, attempt: 120 * attempt,
        gpu=1,
        # The training process and its data-loading workers, per GPU (SLURM: --cpus-per-gpu).
        cpus_per_gpu=lambda wildcards, threads: threads
        + method_config(wildcards.method, wildcards.dataset)["train"]["num_workers"],
    params:
        run=run_config,
        out_dir=subpath(output.model, parent=True),
        split_args=split_args,
    shell:
        "python -m weakshot train --run-config {params.run:q} --prepared {input.prepared}"
        " {params.split_args} --out-dir {params.out_dir} --threads {threads} --gpus {resources.gpu}"
        " > {log} 2>&1"


# Models trained once per dataset (FullyOracle; the CAM classifier of the baselines): the same job without a
# split or an initial model.
use rule train as train_dataset_model with:
    input:
        unpack(dataset_model_inputs),
        prepared="results/{dataset}/prepared",
    output:
        model="results/{dataset}/models/{method}/seed{seed}/model.pt",
        config="results/{dataset}/models/{method}/seed{seed}/config.yaml",
    log:
        "logs/{dataset}/train/{method}_seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/train/{method}_seed{seed}.tsv"
    wildcard_constraints:
        method=one_of(DATASET_METHODS),
    params:
        run=run_config,
        out_dir=subpath(output.model, parent=True),
        split_args="",
