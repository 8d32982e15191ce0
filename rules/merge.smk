# Unit checkpoints -> merged models' perplexity rows, in batches, without writing a merged
# checkpoint (the engine); and, on request only, a merged checkpoint folder.


rule score_merged:
    """Average each mixture of a batch in memory and score it: one engine job per batch."""
    input:
        get_engine_inputs,
    output:
        rows="results/ppl/merged/{method}/{anchor}/{chunk}.csv",
        timings="results/benchmarks/engine/{method}/{anchor}/{chunk}.csv",
    log:
        "logs/engine/{method}/{anchor}/{chunk}.log",
    benchmark:
        "results/benchmarks/evaluate/merged/{method}/{anchor}/{chunk}.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("engine", "threads")
    resources:
        mem_mb=mem_mb("engine"),
        runtime=res("engine", "runtime"),
        gpu=res("engine", "gpu"),
        cpus_per_task=cpus_per_task,
    params:
        flags=engine_flags,
        eval=EVAL_FLAGS,
    shell:
        "python -m mergemix.engine --method {wildcards.method} {params.flags} {params.eval}"
        " --threads {threads} --out {output.rows} --timings {output.timings} > {log} 2>&1"


rule merge:
    """A mixture's merged checkpoint, written only when asked for by path (e.g. to deploy it).

    The study itself never needs it: `score_merged` scores the same average in memory.
    """
    input:
        get_merge_inputs,
    output:
        model="work/models/merged/{method}/{mixture}/model.safetensors",
        config="work/models/merged/{method}/{mixture}/config.json",
        sidecar="work/models/merged/{method}/{mixture}/mergemix.json",
    log:
        "logs/merge/{method}/{mixture}.log",
    benchmark:
        "results/benchmarks/merge/{method}/{mixture}.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    params:
        flags=merge_flags,
    shell:
        "python -m mergemix.merge --method {wildcards.method} {params.flags}"
        " --out work/models/merged/{wildcards.method}/{wildcards.mixture} > {log} 2>&1"
