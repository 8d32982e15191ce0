# Size transfer (paper 5.4 / A.6), included only when config `transfer` is set: a seed of
# a larger model, seq models of that size on the TRANSFER_MIXTURES, their perplexities,
# and the analysis with them as the truth (results/transfer/). The proxies it scores are
# the small models' own, made by the other rule files: nothing here merges.

# The large shape; context length and vocabulary stay the small model's, so both sizes
# are scored on the same evaluation windows. (A transfer.pretrained seed brings its own
# context length: its seq models are then scored in windows of that length.)
LARGE_MODEL = {**config["model"], **TRANSFER["model"]}
LARGE_FLAGS = (
    f"--tokenizer work/tokenizer --model-json {json_flag(LARGE_MODEL)}"
    f" --train-json {json_flag(ENGINE)} --seed {config['random_seed']}"
)
LARGE_SEED_PHASE = {k: v for k, v in TRANSFER["seed_phase"].items() if k != "tokens"}


rule seed_large:
    """Pretrain the large seed on the seed corpus (or import transfer.pretrained)."""
    input:
        tokenizer="work/tokenizer/tokenizer.json",
        shard=(
            []
            if TRANSFER["pretrained"]
            else shard_files(shard("train", "seed", "seed"))
        ),
    output:
        model="work/models/seed_large/model.safetensors",
        config="work/models/seed_large/config.json",
        sidecar="work/models/seed_large/mergemix.json",
    log:
        "logs/train/seed_large.log",
    benchmark:
        "results/benchmarks/train/seed_large.tsv"
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
            f"--pretrained {shlex.quote(TRANSFER['pretrained'])}"
            if TRANSFER["pretrained"]
            else f"--unit {shard('train', 'seed', 'seed')}:0 --unit-tokens {TRANSFER['seed_phase']['tokens']}"
            f" --phase-json {json_flag(LARGE_SEED_PHASE)}"
        ),
        flags=LARGE_FLAGS,
    shell:
        "python -m mergemix.train --kind seed {params.how} {params.flags}"
        " --checkpoint-every {resources.checkpoint_every} --threads {threads} --out work/models/seed_large > {log} 2>&1"


rule seq_large:
    """A large seq model: the large seed trained on a whole mixture (the transfer's truth)."""
    input:
        seed="work/models/seed_large/model.safetensors",
        shards=get_seq_inputs,
    output:
        model="work/models/seq_large/{mixture}/model.safetensors",
        config="work/models/seq_large/{mixture}/config.json",
        sidecar="work/models/seq_large/{mixture}/mergemix.json",
    log:
        "logs/train/seq_large/{mixture}.log",
    benchmark:
        "results/benchmarks/train/seq_large/{mixture}.tsv"
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
        flags=(
            f"{LARGE_FLAGS} --init work/models/seed_large --phase-json {json_flag(TRANSFER['continued'])}"
            f" --unit-tokens {config['train']['unit_tokens']}"
        ),
        meta=lambda w: json_flag({"mixture": w.mixture, "size": "large"}),
    shell:
        "python -m mergemix.train --kind seq {params.units}"
        " {params.flags} --meta-json {params.meta}"
        " --checkpoint-every {resources.checkpoint_every}"
        " --threads {resources.per_rank} --processes {resources.ranks}"
        " --out work/models/seq_large/{wildcards.mixture} > {log} 2>&1"


rule evaluate_seq_large:
    """A large seq model on the OOD sets and its partitions' held-out sets (model_id large/MIXTURE)."""
    input:
        model="work/models/seq_large/{mixture}/model.safetensors",
        domains=lambda w: domain_files(mmconfig.mixture_members(w.mixture)),
    output:
        "results/ppl/seq_large/{mixture}.csv",
    log:
        "logs/evaluate/seq_large/{mixture}.log",
    benchmark:
        "results/benchmarks/evaluate/seq_large/{mixture}.tsv"
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
        "python -m mergemix.evaluate --model work/models/seq_large/{wildcards.mixture} --model-kind seq"
        " --model-id large/{wildcards.mixture} --mixture {wildcards.mixture}"
        " {params.domains} {params.flags} --threads {threads} --out {output} > {log} 2>&1"


rule collect_transfer:
    """The small study's rows with the large seq models in place of the small ones."""
    input:
        transfer_ppl_csvs(),
    output:
        "results/transfer/perplexity.csv",
    log:
        "logs/collect_transfer.log",
    conda:
        "../envs/analysis.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    shell:
        "python -m mergemix.collect --out {output} {input} > {log} 2>&1"


rule analyze_transfer:
    """How well the small models' proxies track the large seq models (Tables 2-4 of the transfer)."""
    input:
        table="results/transfer/perplexity.csv",
        code=package_source("analyze"),
    output:
        scores="results/transfer/proxy_scores.csv",
        correlations="results/transfer/correlations.csv",
        tables=expand(
            "results/transfer/tables/table{n}.{ext}",
            n=(2, 3, 4),
            ext=("md", "csv", "tex"),
        ),
    log:
        "logs/analyze_transfer.log",
    conda:
        "../envs/analysis.yaml"
    threads: res("light", "threads")
    resources:
        mem_mb=mem_mb("light"),
        cpus_per_task=cpus_per_task,
        runtime=res("light", "runtime"),
    shell:
        "python -m mergemix.analyze --perplexity {input.table} --out-dir results/transfer > {log} 2>&1"
