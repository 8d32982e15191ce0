# results/perplexity.csv -> correlations, paper-shaped tables, figures.


rule analyze:
    """How well every proxy tracks seq perplexity, per domain (paper Tables 2, 3 and 4)."""
    input:
        table="results/perplexity.csv",
        code=package_source("analyze"),
    output:
        scores="results/proxy_scores.csv",
        correlations="results/correlations.csv",
        table2=multiext("results/tables/table2", ".md", ".csv", ".tex"),
        table3=multiext("results/tables/table3", ".md", ".csv", ".tex"),
        table4=multiext("results/tables/table4", ".md", ".csv", ".tex"),
    log:
        "logs/analyze.log",
    conda:
        "../envs/analysis.yaml"
    resources:
        mem_mb=res("light", "mem_mb"),
        runtime=res("light", "runtime"),
    shell:
        "python -m mergemix.analyze --perplexity {input.table} --out-dir results > {log} 2>&1"


rule figures:
    """Seq vs proxy perplexity, one panel per domain (paper Figure 3), and r per proxy."""
    input:
        scores="results/proxy_scores.csv",
        correlations="results/correlations.csv",
        code=package_source("plots"),
    output:
        multiext("results/figures/figure3", ".png", ".pdf"),
        multiext("results/figures/correlations", ".png", ".pdf"),
    log:
        "logs/figures.log",
    conda:
        "../envs/analysis.yaml"
    resources:
        mem_mb=res("light", "mem_mb"),
        runtime=res("light", "runtime"),
    params:
        proxy=config["analysis"]["figure_proxy"],
    shell:
        "python -m mergemix.plots --scores {input.scores} --correlations {input.correlations}"
        " --proxy {params.proxy} --out-dir results/figures > {log} 2>&1"
