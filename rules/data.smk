# Dataset stage: an archive (drawn by the embedded generator, or downloaded and verified), its safe
# extraction, and its conversion to the prepared layout (images/{train,test}, labels/{train,test}, 255
# ignore, classes.yaml) that every later stage reads.


# Downloads run where Snakemake runs (the login node on a cluster): compute nodes often have no internet.
localrules:
    download,
    download_pretrained,


rule generate_embedded:
    output:
        archive="resources/{dataset}/archive.zip",
        classes="resources/{dataset}/classes.yaml",
    log:
        "logs/{dataset}/generate_embedded.log",
    benchmark:
        "benchmarks/{dataset}/generate_embedded.tsv"
    wildcard_constraints:
        dataset=one_of(EMBEDDED_DATASETS),
    conda:
        "../envs/weakshot.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        spec=generator_spec,
    shell:
        "python -m weakshot generate-embedded --spec {params.spec:q}"
        " --archive {output.archive} --classes {output.classes} > {log} 2>&1"


rule download:
    output:
        "resources/{dataset}/archive.zip",
    log:
        "logs/{dataset}/download.log",
    benchmark:
        "benchmarks/{dataset}/download.tsv"
    wildcard_constraints:
        dataset=one_of(DOWNLOADED_DATASETS),
    retries: 2
    conda:
        "../envs/weakshot.yaml"
    resources:
        mem_mb=1000,
        runtime=lambda wildcards, attempt: 240 * attempt,
    params:
        url=lambda wildcards: dataset_config(wildcards)["url"],
        checks=download_checks,
    shell:
        "python -m weakshot download --url {params.url:q} --out {output} {params.checks} > {log} 2>&1"


# ImageNet backbone weights of the paper-scale configs (config `pretrained`), verified like the archives.
use rule download as download_pretrained with:
    output:
        "resources/pretrained/{name}.pth",
    log:
        "logs/pretrained/{name}.log",
    benchmark:
        "benchmarks/pretrained/{name}.tsv"
    wildcard_constraints:
        name=one_of(list(config.get("pretrained", {}))),
    params:
        url=lambda wildcards: config["pretrained"][wildcards.name]["url"],
        checks=lambda wildcards: checksum_flags(config["pretrained"][wildcards.name]),


rule extract:
    input:
        "resources/{dataset}/archive.zip",
    output:
        temp(directory("resources/{dataset}/raw")),
    log:
        "logs/{dataset}/extract.log",
    benchmark:
        "benchmarks/{dataset}/extract.tsv"
    conda:
        "../envs/weakshot.yaml"
    resources:
        mem_mb=2000,
        runtime=lambda wildcards, attempt: 60 * attempt,
    shell:
        "python -m weakshot extract --archive {input} --out {output} > {log} 2>&1"


rule prepare:
    input:
        raw="resources/{dataset}/raw",
        classes=class_table,
    output:
        directory("results/{dataset}/prepared"),
    log:
        "logs/{dataset}/prepare.log",
    benchmark:
        "benchmarks/{dataset}/prepare.tsv"
    conda:
        "../envs/weakshot.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        layout=lambda wildcards: dataset_config(wildcards)["layout"],
        exclude=exclude_train_flag,
    shell:
        "python -m weakshot prepare --layout {params.layout} --raw {input.raw}"
        " --classes {input.classes} --out {output} {params.exclude} > {log} 2>&1"
