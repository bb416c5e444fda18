# Pseudo-label stage (SimFormer's multi-stage schedule, step 2): a trained weak-shot model labels the
# training images (GT base pixels + predicted novel classes named by the image-level labels); the retraining
# methods (`method.pseudo_labels` in config) train on the PNGs. workflow/weakshot/methods/pseudo_labels.py.


rule pseudo_labels:
    input:
        model="results/{dataset}/models/{method}/{split}/seed{seed}/model.pt",
        prepared="results/{dataset}/prepared",
        split="results/{dataset}/splits/{split}.yaml",
        image_labels="results/{dataset}/splits/{split}_image_labels.tsv",
    output:
        labels=directory("results/{dataset}/pseudo_labels/{method}/{split}/seed{seed}"),
        report="results/{dataset}/pseudo_labels/{method}/{split}/seed{seed}.json",
    log:
        "logs/{dataset}/pseudo_labels/{method}_{split}_seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/pseudo_labels/{method}_{split}_seed{seed}.tsv"
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
        "python -m weakshot pseudo-labels --model {params.model_dir} --prepared {input.prepared}"
        " --split {input.split} --image-labels {input.image_labels} --out-dir {output.labels}"
        " --report {output.report} --threads {threads} > {log} 2>&1"


# WSSS baseline: pseudo-labels from the CAM classifier (trained once per dataset on the image-level labels of
# every class), restricted to the novel classes each image's labels name. workflow/weakshot/methods/cam.py.
rule cam_pseudo_labels:
    input:
        model="results/{dataset}/models/cam_classifier/seed{seed}/model.pt",
        prepared="results/{dataset}/prepared",
        split="results/{dataset}/splits/{split}.yaml",
        image_labels="results/{dataset}/splits/{split}_image_labels.tsv",
    output:
        labels=directory("results/{dataset}/pseudo_labels/cam/{split}/seed{seed}"),
        report="results/{dataset}/pseudo_labels/cam/{split}/seed{seed}.json",
    log:
        "logs/{dataset}/pseudo_labels/cam_{split}_seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/pseudo_labels/cam_{split}_seed{seed}.tsv"
    conda:
        "../envs/weakshot.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        model_dir=subpath(input.model, parent=True),
    shell:
        "python -m weakshot cam-pseudo-labels --model {params.model_dir} --prepared {input.prepared}"
        " --split {input.split} --image-labels {input.image_labels} --out-dir {output.labels}"
        " --report {output.report} --threads {threads} > {log} 2>&1"


# RETAB: the CAMs of the CAM classifier propagated by a boundary-aware random walk over the affinities and
# boundaries of the split's RETAB network (trained on base masks). workflow/weakshot/methods/retab.py.
rule retab_pseudo_labels:
    input:
        cam_model="results/{dataset}/models/cam_classifier/seed{seed}/model.pt",
        retab_model="results/{dataset}/models/retab_net/{split}/seed{seed}/model.pt",
        prepared="results/{dataset}/prepared",
        split="results/{dataset}/splits/{split}.yaml",
        image_labels="results/{dataset}/splits/{split}_image_labels.tsv",
    output:
        labels=directory("results/{dataset}/pseudo_labels/retab/{split}/seed{seed}"),
        report="results/{dataset}/pseudo_labels/retab/{split}/seed{seed}.json",
    log:
        "logs/{dataset}/pseudo_labels/retab_{split}_seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/pseudo_labels/retab_{split}_seed{seed}.tsv"
    conda:
        "../envs/weakshot.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        cam_dir=subpath(input.cam_model, parent=True),
        retab_dir=subpath(input.retab_model, parent=True),
    shell:
        "python -m weakshot retab-pseudo-labels --cam-model {params.cam_dir} --retab-model {params.retab_dir}"
        " --prepared {input.prepared} --split {input.split} --image-labels {input.image_labels}"
        " --out-dir {output.labels} --report {output.report} --threads {threads} > {log} 2>&1"
