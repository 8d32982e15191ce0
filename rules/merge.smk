# Unit checkpoints -> merged checkpoints (temporary: they are scored, then deleted).


rule merge:
    """Average a mixture's unit models: micro, macro or token-weighted."""
    input:
        get_merge_inputs,
    output:
        model=temp("work/models/merged/{method}/{mixture}/model.safetensors"),
        config=temp("work/models/merged/{method}/{mixture}/config.json"),
        sidecar=temp("work/models/merged/{method}/{mixture}/mergemix.json"),
    log:
        "logs/merge/{method}/{mixture}.log",
    benchmark:
        "results/benchmarks/merge/{method}/{mixture}.tsv"
    conda:
        "../envs/mergemix.yaml"
    resources:
        mem_mb=res("light", "mem_mb"),
        runtime=res("light", "runtime"),
    params:
        flags=merge_flags,
    shell:
        "python -m mergemix.merge --method {wildcards.method} {params.flags}"
        " --out work/models/merged/{wildcards.method}/{wildcards.mixture} > {log} 2>&1"
