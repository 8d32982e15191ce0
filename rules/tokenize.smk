# Partition files to tokenizer to token shards (train and held-out memmaps, index, sidecar).


rule tokenizer:
    """Train a byte-level BPE on the seed corpus, or fetch a named tokenizer."""
    input:
        []
        if (config["tokenizer"]["name"] or SEED_PRETRAINED)
        else "work/partitions/seed/seed.parquet",
    output:
        "work/tokenizer/tokenizer.json",
    log:
        "logs/tokenizer.log",
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    params:
        how=(
            f"--name {shlex.quote(config['tokenizer']['name'] or SEED_PRETRAINED)}"
            if (config["tokenizer"]["name"] or SEED_PRETRAINED)
            else "--input work/partitions/seed/seed.parquet"
        ),
        vocab=config["tokenizer"]["vocab_size"],
    shell:
        "python -m mergemix.tokenize tokenizer {params.how} --vocab-size {params.vocab}"
        " --out-dir work/tokenizer > {log} 2>&1"


rule shards:
    """Split a partition (or the seed corpus) into train / held-out token shards."""
    input:
        docs=shard_docs,
        tokenizer="work/tokenizer/tokenizer.json",
    output:
        multiext(TRAIN_SHARD, ".bin", ".idx", ".json"),
        multiext(HELDOUT_SHARD, ".bin", ".idx", ".json"),
    log:
        "logs/shards/{group}/{name}.log",
    wildcard_constraints:
        group=r"(?!ood/)[A-Za-z0-9_.-]+",
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    params:
        heldout=heldout_fraction,
        segment=config["tokenizer"]["segment_chars"],
        seed=config["random_seed"],
    shell:
        "python -m mergemix.tokenize shards --input {input.docs} --tokenizer work/tokenizer"
        " --out-dir work/tokens/{wildcards.group}/{wildcards.name} --heldout-fraction {params.heldout}"
        " --segment-chars {params.segment} --seed {params.seed} > {log} 2>&1"


rule shards_ood:
    """An out-of-domain set: every document is an evaluation document."""
    input:
        docs="work/partitions/ood/{name}.parquet",
        tokenizer="work/tokenizer/tokenizer.json",
    output:
        shard_files("work/tokens/ood/{name}/heldout"),
    log:
        "logs/shards/ood/{name}.log",
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    params:
        segment=config["tokenizer"]["segment_chars"],
        seed=config["random_seed"],
    shell:
        "python -m mergemix.tokenize shards --heldout-only --input {input.docs} --tokenizer work/tokenizer"
        " --out-dir work/tokens/ood/{wildcards.name} --heldout-fraction 1 --segment-chars {params.segment}"
        " --seed {params.seed} > {log} 2>&1"


rule data_table:
    """What each partition holds and how often its units pass over it (csv and markdown)."""
    input:
        [
            f"work/tokens/{s}/{p}/{split}.json"
            for p, s in PARTITIONS.items()
            for split in ("train", "heldout")
        ],
    output:
        csv=report(
            "results/tables/data.csv",
            caption="../report/data.rst",
            category="Tables",
            labels={"table": "data"},
        ),
        md="results/tables/data.md",
    log:
        "logs/shards/data_table.log",
    conda:
        "../envs/mergemix.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    params:
        partitions=" ".join(
            f"work/tokens/{s}/{p}:{mmconfig.units(config, p)}"
            for p, s in PARTITIONS.items()
        ),
        unit_tokens=config["train"]["unit_tokens"],
    shell:
        "python -m mergemix.tokenize table {params.partitions} --unit-tokens {params.unit_tokens}"
        " --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"
