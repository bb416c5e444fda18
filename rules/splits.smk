# Split stage: the base/novel class splits of a dataset (the paper's for COCO-Stuff-10K and ADE20K, seeded
# random ones for the embedded dataset) and the image-level labels a weak-shot method may use.


rule image_labels:
    input:
        "results/{dataset}/prepared",
    output:
        "results/{dataset}/image_labels.tsv",
    log:
        "logs/{dataset}/image_labels.log",
    benchmark:
        "benchmarks/{dataset}/image_labels.tsv"
    conda:
        "../envs/weakshot.yaml"
    resources:
        mem_mb=1000,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        min_pixels=lambda wildcards: dataset_config(wildcards)["image_label_min_pixels"],
    shell:
        "python -m weakshot image-labels --prepared {input} --min-pixels {params.min_pixels}"
        " --out {output} > {log} 2>&1"


rule split:
    input:
        classes=class_table,
        reference=split_reference,
    output:
        "results/{dataset}/splits/{split}.yaml",
    log:
        "logs/{dataset}/split_{split}.log",
    benchmark:
        "benchmarks/{dataset}/split_{split}.tsv"
    conda:
        "../envs/weakshot.yaml"
    resources:
        mem_mb=500,
        runtime=5,
    params:
        spec=split_spec,
    shell:
        "python -m weakshot split --classes {input.classes} --spec {params.spec:q}"
        " --name {wildcards.split} --out {output} > {log} 2>&1"


rule split_image_labels:
    input:
        image_labels="results/{dataset}/image_labels.tsv",
        split="results/{dataset}/splits/{split}.yaml",
    output:
        "results/{dataset}/splits/{split}_image_labels.tsv",
    log:
        "logs/{dataset}/split_image_labels_{split}.log",
    benchmark:
        "benchmarks/{dataset}/split_image_labels_{split}.tsv"
    conda:
        "../envs/weakshot.yaml"
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "python -m weakshot split-image-labels --image-labels {input.image_labels}"
        " --split {input.split} --out {output} > {log} 2>&1"
