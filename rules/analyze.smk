# results/perplexity.csv -> statistics and paper-shaped tables -> figures; benchmarks ->
# the efficiency ledger. Outputs flagged with report() make up `snakemake --report`.


rule analyze:
    """How well every proxy tracks seq perplexity, per domain (paper Tables 2, 3 and 4)."""
    input:
        table="results/perplexity.csv",
        code=package_source("analyze"),
    output:
        scores="results/proxy_scores.csv",
        correlations=report(
            "results/correlations.csv",
            caption="../report/correlations.rst",
            category="Results",  # not "Statistics": the report has a panel of that name
            labels={"file": "correlations.csv"},
        ),
        table2=[
            report(
                "results/tables/table2.csv",
                caption="../report/table2.rst",
                category="Tables",
                labels={"table": "2"},
            ),
            "results/tables/table2.md",
            "results/tables/table2.tex",
        ],
        table3=[
            report(
                "results/tables/table3.csv",
                caption="../report/table3.rst",
                category="Tables",
                labels={"table": "3"},
            ),
            "results/tables/table3.md",
            "results/tables/table3.tex",
        ],
        table4=[
            report(
                "results/tables/table4.csv",
                caption="../report/table4.rst",
                category="Tables",
                labels={"table": "4"},
            ),
            "results/tables/table4.md",
            "results/tables/table4.tex",
        ],
    log:
        "logs/analyze.log",
    conda:
        "../envs/analysis.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    shell:
        "python -m mergemix.analyze --perplexity {input.table} --out-dir results > {log} 2>&1"


rule rank:
    """Every candidate mixture ordered by its proxy perplexity: which mixture to train on."""
    input:
        table="results/perplexity.csv",
        code=[package_source("rank"), package_source("analyze")],
    output:
        csv=report(
            "results/ranking.csv",
            caption="../report/ranking.rst",
            category="Results",  # not "Statistics": the report has a panel of that name
            labels={"file": "ranking.csv"},
        ),
        md="results/tables/ranking.md",
    log:
        "logs/rank.log",
    conda:
        "../envs/analysis.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    params:
        proxy=config["analysis"]["rank_by"],
    shell:
        "python -m mergemix.rank --perplexity {input.table} --proxy {params.proxy}"
        " --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule figures:
    """Figures 3 to 9, redrawn from the result tables alone: `snakemake figures` trains nothing."""
    input:
        scores="results/proxy_scores.csv",
        correlations="results/correlations.csv",
        code=package_source("plots"),
    output:
        figure3=[
            report(
                "results/figures/figure3.png",
                caption="../report/figure3.rst",
                category="Figures",
                subcategory="Seq vs. proxy perplexity",
                labels={"figure": "3", "proxy": config["analysis"]["figure_proxy"]},
            ),
            "results/figures/figure3.pdf",
        ],
        figure4=[
            report(
                f"results/figures/figure4_{proxy}.png",
                caption="../report/figure4.rst",
                category="Figures",
                subcategory="Seq vs. proxy perplexity",
                labels={"figure": "4", "proxy": proxy},
            )
            for proxy in PROXIES
        ]
        + expand("results/figures/figure4_{proxy}.pdf", proxy=PROXIES),
        summaries=[
            report(
                f"results/figures/figure{n}.png",
                caption=f"../report/figure{n}.rst",
                category="Figures",
                subcategory="Summaries",
                labels={"figure": str(n), "proxy": "all"},
            )
            for n in range(5, 10)
        ]
        + expand("results/figures/figure{n}.pdf", n=range(5, 10)),
    log:
        "logs/figures.log",
    conda:
        "../envs/analysis.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
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
        sidecars=sidecar_files(),
        # every evaluation job is done (and has written its benchmark file) once the
        # table that collects their rows exists
        table="results/perplexity.csv",
        code=package_source("ledger"),
    output:
        csv=report(
            "results/tables/efficiency.csv",
            caption="../report/efficiency.rst",
            category="Tables",
            labels={"table": "efficiency"},
        ),
        md="results/tables/efficiency.md",
    log:
        "logs/efficiency.log",
    conda:
        "../envs/analysis.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    params:
        # Read, not declared as inputs: a benchmark file is a product of the job it
        # measures, so as an input its loss (say, `rm -r results`) would retrain models.
        benchmarks=benchmark_files(),
        study=study_flags(),
    shell:
        "python -m mergemix.ledger {params.benchmarks} {input.sidecars} {params.study}"
        " --out-dir results/tables > {log} 2>&1"
