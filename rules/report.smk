# Report stage: the appendix tables (CSV + Markdown beside the paper's numbers) from the metrics files.


localrules:
    table,


rule table:
    input:
        metrics=table_metrics,
        paper="config/paper_tables.yaml",
    output:
        csv="results/{table}.csv",
        md="results/{table}.md",
    log:
        "logs/tables/{table}.log",
    wildcard_constraints:
        table="table1|table2",
    conda:
        "../envs/weakshot.yaml"
    params:
        spec=table_spec,
        metrics_dir=lambda wildcards: f"results/{config['dataset']}/metrics",
    shell:
        "python -m weakshot table --spec {params.spec:q} --metrics-dir {params.metrics_dir}"
        " --paper {input.paper} --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"
