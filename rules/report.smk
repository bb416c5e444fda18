# Report stage: the appendix tables (CSV + Markdown beside the paper's numbers) from the metrics files.


localrules:
    table,
    table3,
    figure,
    report,


rule table:
    input:
        metrics=table_metrics,
        paper="config/paper_tables.yaml",
    output:
        csv=report(
            "results/{table}.csv", caption="../report/table.rst", category="Tables"
        ),
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
        extra="",
    shell:
        "python -m weakshot table --spec {params.spec:q} --metrics-dir {params.metrics_dir}"
        " --paper {input.paper} --out-csv {output.csv} --out-md {output.md} {params.extra} > {log} 2>&1"


# Table 3 also states each split's base and novel ratio and plots novel mIoU against the novel ratio.
use rule table as table3 with:
    input:
        metrics=table_metrics,
        paper="config/paper_tables.yaml",
        splits=lambda wildcards: expand(
            "results/{dataset}/splits/{split}.yaml",
            dataset=config["dataset"],
            split=config["tables"]["table3"]["columns"],
        ),
    output:
        csv=report(
            "results/{table}.csv", caption="../report/table3.rst", category="Tables"
        ),
        md="results/{table}.md",
        plot=report(
            "results/{table}.png",
            caption="../report/table3_plot.rst",
            category="Tables",
        ),
    wildcard_constraints:
        table="table3",
    params:
        spec=table_spec,
        metrics_dir=lambda wildcards: f"results/{config['dataset']}/metrics",
        extra=lambda wildcards, output: f"--splits-dir results/{config['dataset']}/splits --out-plot {output.plot}",


rule figure:
    input:
        unpack(figure_inputs),
    output:
        report(
            "results/{figure}.png", caption="../report/figure.rst", category="Figures"
        ),
    log:
        "logs/figures/{figure}.log",
    wildcard_constraints:
        figure="figure[0-9]+",
    conda:
        "../envs/weakshot.yaml"
    params:
        flags=figure_flags,
    shell:
        "python -m weakshot figure --prepared {input.prepared} --split {input.split} {params.flags}"
        " --out {output} > {log} 2>&1"


# The HTML report (tables, the Table 3 plot and the figures, with their captions): Snakemake's own `--report`,
# run once they exist, so the default target delivers it. The inner call gets this run's resolved config (the
# same DAG whatever --configfile was given) and --nolock, since this run holds the working directory's lock.
rule report:
    input:
        report_inputs(),
    output:
        "results/report.html",
    log:
        "logs/report.log",
    conda:
        "../envs/weakshot.yaml"
    params:
        config=lambda wildcards: json.dumps(config),
    shell:
        "python -m snakemake {input} --report {output} --nolock --configfile <(echo {params.config:q})"
        " > {log} 2>&1"
