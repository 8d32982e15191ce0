# results/perplexity.csv -> statistics and paper-shaped tables -> figures; benchmarks ->
# the efficiency ledger.


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
    """Figures 3 to 9, redrawn from the result tables alone: `snakemake figures` trains nothing."""
    input:
        scores="results/proxy_scores.csv",
        correlations="results/correlations.csv",
        code=package_source("plots"),
    output:
        figure3=multiext("results/figures/figure3", ".png", ".pdf"),
        figure4=expand("results/figures/figure4_{proxy}.{ext}", proxy=PROXIES, ext=["png", "pdf"]),
        summaries=expand("results/figures/figure{n}.{ext}", n=range(5, 10), ext=["png", "pdf"]),
    log:
        "logs/figures.log",
    conda:
        "../envs/analysis.yaml"
    resources:
        mem_mb=res("light", "mem_mb"),
        runtime=res("light", "runtime"),
    params:
        proxy=config["analysis"]["figure_proxy"],
        grid=" ".join(PROXIES),
    shell:
        "python -m mergemix.plots --scores {input.scores} --correlations {input.correlations}"
        " --proxy {params.proxy} --grid-proxies {params.grid} --out-dir results/figures > {log} 2>&1"


rule efficiency:
    """Measured compute of modular training vs. a seq model per mixture (paper section 5.5)."""
    input:
        benchmarks=benchmark_files(),
        sidecars=sidecar_files(),
        code=package_source("ledger"),
    output:
        csv="results/tables/efficiency.csv",
        md="results/tables/efficiency.md",
    log:
        "logs/efficiency.log",
    conda:
        "../envs/analysis.yaml"
    resources:
        mem_mb=res("light", "mem_mb"),
        runtime=res("light", "runtime"),
    params:
        study=study_flags(),
    shell:
        "python -m mergemix.ledger {input.benchmarks} {input.sidecars} {params.study}"
        " --out-dir results/tables > {log} 2>&1"
