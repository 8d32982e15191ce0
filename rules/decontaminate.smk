# Partition files to decontaminated partition files (docs/decontamination.md): a source
# partition's documents that share a paragraph of >= decontaminate.min_paragraph_tokens
# words with an evaluation set of decontaminate.against are dropped before tokenization.


rule eval_filter:
    """A Bloom filter of every paragraph of the evaluation sets in decontaminate.against."""
    input:
        get_eval_filter_inputs,
    output:
        bits=f"{EVAL_FILTER}.bin",
        filter=f"{EVAL_FILTER}.json",
    log:
        "logs/decontaminate/eval_filter.log",
    benchmark:
        "results/benchmarks/decontaminate/eval_filter.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    params:
        sets=eval_filter_flags,
        tokens=DECONTAMINATE["min_paragraph_tokens"],
        rate=DECONTAMINATE["false_positive_rate"],
    shell:
        "python -m mergemix.decontaminate filter {params.sets} --min-paragraph-tokens {params.tokens}"
        " --false-positive-rate {params.rate} --out {output.filter} > {log} 2>&1"


rule decontaminate:
    """One source partition without its documents that share a paragraph with the filter."""
    input:
        docs="work/partitions/{group}/{name}.parquet",
        bits=f"{EVAL_FILTER}.bin",
        filter=f"{EVAL_FILTER}.json",
    output:
        docs="work/decontaminate/{group}/{name}.parquet",
        report="work/decontaminate/{group}/{name}.json",
    log:
        "logs/decontaminate/{group}/{name}.log",
    benchmark:
        "results/benchmarks/decontaminate/{group}/{name}.tsv"
    wildcard_constraints:
        group=r"(?!(?:seed|ood)/)[A-Za-z0-9_.-]+",
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    shell:
        "python -m mergemix.decontaminate partition --input {input.docs} --filter {input.filter}"
        " --out {output.docs} --report {output.report} > {log} 2>&1"


rule decontamination_table:
    """Documents in, removed and kept per partition, one row each (csv and markdown)."""
    input:
        reports=[f"work/decontaminate/{s}/{p}.json" for p, s in PARTITIONS.items()],
        filter=f"{EVAL_FILTER}.json",
    output:
        csv=report(
            "results/tables/decontamination.csv",
            caption="../report/decontamination.rst",
            category="Tables",
            labels={"table": "decontamination"},
        ),
        md="results/tables/decontamination.md",
    log:
        "logs/decontaminate/table.log",
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    shell:
        "python -m mergemix.decontaminate table --filter {input.filter} --out-csv {output.csv}"
        " --out-md {output.md} {input.reports} > {log} 2>&1"
