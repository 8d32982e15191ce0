# Token shards -> seed checkpoint -> unit, ind and seq checkpoints (DeepSpeed).

# Only the settings a model depends on go into its rule's params (Snakemake reruns a job
# when its params change): the optimizer and engine for every model, the seed phase for
# the seed, the continued phase and unit size for the rest. train.checkpoint_every (how
# often resume states are written) and a seq job's processes and threads per process are
# operational settings like runtime, so they are passed as resources, which (unlike
# params and the command text) Snakemake does not watch: changing them retrains nothing.
CHECKPOINT_EVERY = config["train"]["checkpoint_every"]
ENGINE_KEYS = ("precision", "zero_stage", "betas", "weight_decay", "grad_clip")
# train.micro_batch joins them when set: it changes the order of float sums (left out
# when null, so studies from before it existed keep their params).
ENGINE = {k: config["train"][k] for k in ENGINE_KEYS} | (
    {"micro_batch": config["train"]["micro_batch"]}
    if config["train"].get("micro_batch")
    else {}
)
TRAIN_FLAGS = (
    f"--tokenizer work/tokenizer --model-json {json_flag(config['model'])}"
    f" --train-json {json_flag(ENGINE)} --seed {config['random_seed']}"
)
CONTINUED = f"--init work/models/seed --phase-json {json_flag(config['train']['continued'])} --unit-tokens {config['train']['unit_tokens']}"
SEED_PHASE = {k: v for k, v in config["train"]["seed_phase"].items() if k != "tokens"}


rule seed:
    """Pretrain the shared seed model on the seed corpus (or import seed.pretrained)."""
    input:
        tokenizer="work/tokenizer/tokenizer.json",
        shard=[] if SEED_PRETRAINED else shard_files(shard("train", "seed", "seed")),
    output:
        model="work/models/seed/model.safetensors",
        config="work/models/seed/config.json",
        sidecar="work/models/seed/mergemix.json",
    log:
        "logs/train/seed.log",
    benchmark:
        "results/benchmarks/train/seed.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("seed", "threads")
    resources:
        mem_mb=mem_mb("seed"),
        runtime=res("seed", "runtime"),
        gpu=res("seed", "gpu"),
        checkpoint_every=CHECKPOINT_EVERY,
        cpus_per_task=cpus_per_task,
    params:
        how=(
            f"--pretrained {shlex.quote(SEED_PRETRAINED)}"
            if SEED_PRETRAINED
            else f"--unit {shard('train', 'seed', 'seed')}:0 --unit-tokens {config['train']['seed_phase']['tokens']}"
            f" --phase-json {json_flag(SEED_PHASE)}"
        ),
        flags=TRAIN_FLAGS,
    shell:
        "python -m mergemix.train --kind seed {params.how} {params.flags}"
        " --checkpoint-every {resources.checkpoint_every} --threads {threads} --out work/models/seed > {log} 2>&1"


rule unit:
    """Continue pretraining the seed on one base unit of one partition."""
    input:
        seed="work/models/seed/model.safetensors",
        shard=shard_files("work/tokens/{source}/{partition}/train"),
    output:
        model="work/models/unit/{source}/{partition}/{unit}/model.safetensors",
        config="work/models/unit/{source}/{partition}/{unit}/config.json",
        sidecar="work/models/unit/{source}/{partition}/{unit}/mergemix.json",
    log:
        "logs/train/unit/{source}/{partition}/{unit}.log",
    benchmark:
        "results/benchmarks/train/unit/{source}/{partition}/{unit}.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("train", "threads")
    resources:
        mem_mb=mem_mb("train"),
        runtime=res("train", "runtime"),
        gpu=res("train", "gpu"),
        checkpoint_every=CHECKPOINT_EVERY,
        cpus_per_task=cpus_per_task,
    params:
        flags=f"{TRAIN_FLAGS} {CONTINUED}",
        meta=lambda w: json_flag({"partition": w.partition, "unit": int(w.unit)}),
    shell:
        "python -m mergemix.train --kind unit"
        " --unit work/tokens/{wildcards.source}/{wildcards.partition}/train:{wildcards.unit}"
        " {params.flags} --meta-json {params.meta}"
        " --checkpoint-every {resources.checkpoint_every}"
        " --threads {threads}"
        " --out work/models/unit/{wildcards.source}/{wildcards.partition}/{wildcards.unit} > {log} 2>&1"


rule ind:
    """A partition of several units trained alone (one-unit partitions reuse their unit model)."""
    input:
        seed="work/models/seed/model.safetensors",
        shard=lambda w: shard_files(
            shard("train", PARTITIONS[w.partition], w.partition)
        ),
    output:
        model="work/models/ind/{partition}/model.safetensors",
        config="work/models/ind/{partition}/config.json",
        sidecar="work/models/ind/{partition}/mergemix.json",
    log:
        "logs/train/ind/{partition}.log",
    benchmark:
        "results/benchmarks/train/ind/{partition}.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("train", "threads")
    resources:
        mem_mb=mem_mb("train"),
        runtime=res("train", "runtime"),
        gpu=res("train", "gpu"),
        checkpoint_every=CHECKPOINT_EVERY,
        cpus_per_task=cpus_per_task,
    params:
        units=lambda w: " ".join(f"--unit {u}" for u in partition_units(w.partition)),
        flags=f"{TRAIN_FLAGS} {CONTINUED}",
        meta=lambda w: json_flag({"partitions": [w.partition]}),
    shell:
        "python -m mergemix.train --kind ind {params.units}"
        " {params.flags} --meta-json {params.meta}"
        " --checkpoint-every {resources.checkpoint_every}"
        " --threads {threads}"
        " --out work/models/ind/{wildcards.partition} > {log} 2>&1"


rule seq:
    """The ground truth: the seed trained on a whole mixture, its units' windows shuffled together."""
    input:
        seed="work/models/seed/model.safetensors",
        shards=get_seq_inputs,
    output:
        model="work/models/seq/{mixture}/model.safetensors",
        config="work/models/seq/{mixture}/config.json",
        sidecar="work/models/seq/{mixture}/mergemix.json",
    log:
        "logs/train/seq/{mixture}.log",
    benchmark:
        "results/benchmarks/train/seq/{mixture}.tsv"
    conda:
        "../envs/mergemix.yaml"
    threads: res("seq", "threads") * ranks("seq")
    resources:
        mem_mb=mem_mb("seq", per=ranks("seq")),
        runtime=res("seq", "runtime"),
        gpu=res("seq", "gpu"),
        checkpoint_every=CHECKPOINT_EVERY,
        cpus_per_task=cpus_per_task,
        ranks=ranks("seq"),
        per_rank=res("seq", "threads"),
    params:
        units=seq_unit_flags,
        flags=f"{TRAIN_FLAGS} {CONTINUED}",
        meta=lambda w: json_flag({"mixture": w.mixture}),
    shell:
        "python -m mergemix.train --kind seq {params.units}"
        " {params.flags} --meta-json {params.meta}"
        " --checkpoint-every {resources.checkpoint_every}"
        " --threads {resources.per_rank} --processes {resources.ranks}"
        " --out work/models/seq/{wildcards.mixture} > {log} 2>&1"
