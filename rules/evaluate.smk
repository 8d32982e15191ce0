# Checkpoints -> perplexity rows per model -> results/perplexity.csv.

ALL_PARTITIONS = list(PARTITIONS)


rule evaluate_seed:
    """The seed on every domain (the starting point the proxies move away from)."""
    input:
        model="work/models/seed/model.safetensors",
        domains=domain_files(ALL_PARTITIONS),
    output:
        "results/ppl/seed/seed.csv",
    log:
        "logs/evaluate/seed.log",
    benchmark:
        "results/benchmarks/evaluate/seed.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=mem_mb("evaluate"),
        runtime=res("evaluate", "runtime"),
        gpu=res("evaluate", "gpu"),
        cpus_per_task=cpus_per_task,
    params:
        domains=domain_flags(ALL_PARTITIONS),
        flags=EVAL_FLAGS,
    shell:
        "python -m mergemix.evaluate --model work/models/seed --model-kind seed --model-id seed"
        " --mixture seed {params.domains} {params.flags} --threads {threads} --out {output} > {log} 2>&1"


rule evaluate_unit:
    """A one-unit partition's model (its ind model) on every domain."""
    input:
        model=lambda w: f"{unit_dir(w.partition, w.unit)}/model.safetensors",
        domains=domain_files(ALL_PARTITIONS),
    output:
        "results/ppl/unit/{partition}/{unit}.csv",
    log:
        "logs/evaluate/unit/{partition}/{unit}.log",
    benchmark:
        "results/benchmarks/evaluate/unit/{partition}/{unit}.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=mem_mb("evaluate"),
        runtime=res("evaluate", "runtime"),
        gpu=res("evaluate", "gpu"),
        cpus_per_task=cpus_per_task,
    params:
        model=lambda w: unit_dir(w.partition, w.unit),
        domains=domain_flags(ALL_PARTITIONS),
        flags=EVAL_FLAGS,
    shell:
        "python -m mergemix.evaluate --model {params.model} --model-kind unit"
        " --model-id {wildcards.partition}/{wildcards.unit} --mixture {wildcards.partition}"
        " {params.domains} {params.flags} --threads {threads} --out {output} > {log} 2>&1"


rule evaluate_ind:
    """A several-unit partition's ind model on every domain."""
    input:
        model="work/models/ind/{partition}/model.safetensors",
        domains=domain_files(ALL_PARTITIONS),
    output:
        "results/ppl/ind/{partition}.csv",
    log:
        "logs/evaluate/ind/{partition}.log",
    benchmark:
        "results/benchmarks/evaluate/ind/{partition}.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=mem_mb("evaluate"),
        runtime=res("evaluate", "runtime"),
        gpu=res("evaluate", "gpu"),
        cpus_per_task=cpus_per_task,
    params:
        domains=domain_flags(ALL_PARTITIONS),
        flags=EVAL_FLAGS,
    shell:
        "python -m mergemix.evaluate --model work/models/ind/{wildcards.partition} --model-kind ind"
        " --model-id {wildcards.partition} --mixture {wildcards.partition}"
        " {params.domains} {params.flags} --threads {threads} --out {output} > {log} 2>&1"


rule evaluate_seq:
    """A seq model on the OOD sets and its own partitions' held-out sets."""
    input:
        model="work/models/seq/{mixture}/model.safetensors",
        domains=lambda w: domain_files(mmconfig.mixture_members(w.mixture)),
    output:
        "results/ppl/seq/{mixture}.csv",
    log:
        "logs/evaluate/seq/{mixture}.log",
    benchmark:
        "results/benchmarks/evaluate/seq/{mixture}.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=mem_mb("evaluate"),
        runtime=res("evaluate", "runtime"),
        gpu=res("evaluate", "gpu"),
        cpus_per_task=cpus_per_task,
    params:
        domains=lambda w: domain_flags(mmconfig.mixture_members(w.mixture)),
        flags=EVAL_FLAGS,
    shell:
        "python -m mergemix.evaluate --model work/models/seq/{wildcards.mixture} --model-kind seq"
        " --model-id {wildcards.mixture} --mixture {wildcards.mixture}"
        " {params.domains} {params.flags} --threads {threads} --out {output} > {log} 2>&1"


rule collect:
    """All per-model rows in one tidy table (merged models' rows come in engine batches)."""
    input:
        all_ppl_csvs(),
    output:
        "results/perplexity.csv",
    log:
        "logs/collect.log",
    conda:
        "../envs/analysis.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    shell:
        "python -m mergemix.collect --out {output} {input} > {log} 2>&1"
