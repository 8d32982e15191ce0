"""Helpers shared by the stage files: config validation, the study's nouns, input functions.

All logic of substance lives in the `mergemix` package; this file only turns config
into file paths and command-line flags.
"""

import importlib.util
import json
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from mergemix import config as mmconfig

try:
    for configfile_path in workflow.configfiles:
        mmconfig.check_unique_keys(configfile_path)
    mmconfig.validate(config)
    # Local data files by config section, globbed once here for every partition job.
    DATA_FILES = mmconfig.check_data_files(config)
except mmconfig.ConfigError as exc:
    sys.exit(f"config error: {exc}")


# Rules run `python -m mergemix.<stage>`. The interpreter running this workflow has just
# imported mergemix, so its bin folder goes first on every job's PATH: `.venv/bin/snakemake`
# works without an activated venv, and a rule's `python` is never another Python that
# lacks the package. (With --use-conda each rule's own environment provides python.)
# The prefix keeps Snakemake's default strict mode for bash.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:

    shell.prefix(
        f'set -euo pipefail; export PATH={shlex.quote(os.path.dirname(sys.executable))}:"$PATH"; '
    )
else:
    # With --sdm conda the environments in envs/ provide python and the libraries, and
    # mergemix itself comes from this checkout's src/ folder.
    os.environ.update(
        PYTHONPATH=os.pathsep.join(
            filter(
                None,
                [os.path.join(workflow.basedir, "src"), os.environ.get("PYTHONPATH")],
            )
        )
    )


# Where downloads and DeepSpeed's compiled ops are cached (cache_dir) reaches the jobs
# through the environment instead of params (Snakemake reruns a job whose params
# change), so moving the cache retrains nothing. A TORCH_EXTENSIONS_DIR set by the user
# wins.
os.environ.update(
    MERGEMIX_CACHE=config["cache_dir"],
    TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR")
    or os.path.join(config["cache_dir"], "torch_extensions"),
)

PARTITIONS = mmconfig.partitions(config)  # partition -> source
MIXTURES = mmconfig.mixtures(config)
SEQ_MIXTURES = mmconfig.seq_mixtures(config, MIXTURES)
# "ANCHOR/CHUNK" -> mixtures scored by one engine job (see mmconfig.mixture_batches for
# why batches are keyed by the member listed last: growing the study adds batches
# instead of changing old ones).
BATCHES = mmconfig.mixture_batches(config, MIXTURES)
# Mixtures with a large seq model (paper 5.4 size transfer; none without `transfer`).
TRANSFER = config.get("transfer")
TRANSFER_MIXTURES = mmconfig.transfer_mixtures(config, MIXTURES)
OOD = list(config["eval"]["ood"])
SEED_PRETRAINED = config["seed"]["pretrained"]
TRAIN_SHARD = "work/tokens/{group}/{name}/train"
HELDOUT_SHARD = "work/tokens/{group}/{name}/heldout"


def json_flag(obj):
    """A JSON value quoted for the shell (rules pass config sections this way)."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def package_source(module):
    """The source file of mergemix.<module>, an input of the rules that run it.

    Editing the analysis or plotting code reruns those rules and nothing else. Training
    code is deliberately not an input, so a refactor never retrains models.
    """
    return importlib.util.find_spec(f"mergemix.{module}").origin


def res(kind, key):
    return config["resources"][kind][key]


def mem_mb(kind, per=1):
    """A rule's mem_mb: resources.<kind>.mem_mb (times `per`, e.g. ranks) on the first
    attempt, that times the attempt number on a retry (2x, then 3x), so a job the
    cluster killed for exceeding its memory asks for more when Snakemake resubmits it
    (`retries` in the profile)."""
    base = res(kind, "mem_mb") * per

    def grown(wildcards, attempt):
        return base * attempt

    return grown


def ranks(kind):
    return mmconfig.ranks(config, kind)


def cpus_per_task(wildcards, threads):
    """CPUs a cluster job asks for: the rule's threads after --cores/--max-threads caps.

    Declared as a resource so that a profile's default `cpus_per_task` (meant for rules
    without threads) never overrides a rule's threads on Slurm.
    """
    return threads


# --- corpus ---------------------------------------------------------------------------


def load_spec(group, name):
    """The config entry describing where documents of a partition file come from."""
    if group == "seed":
        return config["seed"]
    if group == "ood":
        return config["eval"]["ood"][name]
    return config["sources"][group]


def get_raw_inputs(wildcards):
    """Files a partition job reads: a demo recipe's parquet, or the user's local files
    (glob patterns expanded to the files they match; remote files are not inputs)."""
    load = load_spec(wildcards.group, wildcards.name)["load"]
    if "demo" in load:
        return [f"work/raw/{load['demo']}.parquet"]
    group, name = wildcards.group, wildcards.name
    return DATA_FILES[
        {"seed": "seed", "ood": f"eval.ood.{name}"}.get(group, f"sources.{group}")
    ]


def partition_rename(entry, name):
    """The rename entries that decide which documents partition `name` holds: raw keys
    renamed to it, and its own raw key if that is renamed away. Only these are in its
    job's params, so renaming other groups later does not rerun it. Keys as
    mergemix.corpus compares them, through str(): a YAML null key is the raw key of
    missing values, "None"."""
    rename = entry.get("rename") or {}
    return {str(k): v for k, v in rename.items() if v == name or str(k) == name}


def partition_spec(wildcards):
    """The JSON spec `python -m mergemix.corpus partition` reads for one partition file."""
    group, name = wildcards.group, wildcards.name
    entry = load_spec(group, name)
    spec = {
        "source": group if group != "ood" else name,
        "load": entry["load"],
        "demo_dir": "work/raw",
        "text_column": entry["text_column"],
        "partition_by": (
            entry.get("partition_by", []) if group not in ("seed", "ood") else []
        ),
        "rename": partition_rename(entry, name) if group not in ("seed", "ood") else {},
        "partitions": [name],
        "seed": config["random_seed"],
    }
    return json_flag(spec)


# --- decontamination ------------------------------------------------------------------

DECONTAMINATE = config["decontaminate"]
EVAL_FILTER = "work/decontaminate/eval_filter"
# The decontamination table is a target only when decontamination is on.
DECONTAMINATION_TABLE = (
    ["results/tables/decontamination.csv", "results/tables/decontamination.md"]
    if DECONTAMINATE["enabled"]
    else []
)


def eval_filter_sets():
    """(--eval flag NAME:HELDOUT_FRACTION:SEED:PATH, partition file) of each set checked
    against: an OOD set's whole file, or the seed corpus's held-out split."""
    out = []
    for name in DECONTAMINATE["against"]:
        path, fraction = f"work/partitions/ood/{name}.parquet", 1
        if "seed_heldout" in config["eval"]["ood"][name]["load"]:
            path = "work/partitions/seed/seed.parquet"
            fraction = config["seed"]["heldout_fraction"]
        out.append((f"{name}:{fraction}:{config['random_seed']}:{path}", path))
    return out


def get_eval_filter_inputs(wildcards):
    return list(dict.fromkeys(path for _, path in eval_filter_sets()))


def eval_filter_flags(wildcards):
    return " ".join(f"--eval {flag}" for flag, _ in eval_filter_sets())


def shard_docs(wildcards):
    """Documents a shards job cuts: a source partition's decontaminated copy when enabled
    (the seed corpus is not decontaminated: docs/decontamination.md says why)."""
    if DECONTAMINATE["enabled"] and wildcards.group != "seed":
        return f"work/decontaminate/{wildcards.group}/{wildcards.name}.parquet"
    return f"work/partitions/{wildcards.group}/{wildcards.name}.parquet"


# --- tokens and units -----------------------------------------------------------------


def shard(kind, group, name):
    template = TRAIN_SHARD if kind == "train" else HELDOUT_SHARD
    return template.format(group=group, name=name)


def shard_files(prefix):
    return [f"{prefix}.bin", f"{prefix}.idx", f"{prefix}.json"]


def heldout_fraction(wildcards):
    if wildcards.group == "seed":
        return config["seed"]["heldout_fraction"]
    return config["sources"][wildcards.group]["heldout_fraction"]


def partition_units(partition):
    """Unit flags (SHARD_PREFIX:INDEX) of every base unit of a partition."""
    prefix = shard("train", PARTITIONS[partition], partition)
    return [f"{prefix}:{u}" for u in range(mmconfig.units(config, partition))]


def unit_dir(partition, unit):
    return f"work/models/unit/{PARTITIONS[partition]}/{partition}/{unit}"


def partition_unit_dirs(partition):
    return [unit_dir(partition, u) for u in range(mmconfig.units(config, partition))]


def ind_dir(partition):
    """A one-unit partition's ind model is its unit model: nothing is trained twice."""
    if mmconfig.units(config, partition) == 1:
        return unit_dir(partition, 0)
    return f"work/models/ind/{partition}"


def get_seq_inputs(wildcards):
    members = mmconfig.mixture_members(wildcards.mixture)
    shards = [f for p in members for f in shard_files(shard("train", PARTITIONS[p], p))]
    return shards


def seq_unit_flags(wildcards):
    members = mmconfig.mixture_members(wildcards.mixture)
    return " ".join(f"--unit {u}" for p in members for u in partition_units(p))


# --- merges ---------------------------------------------------------------------------


def merge_dirs(method, partition):
    """Checkpoints a merge takes from a partition: its ind model for `merged` (paper
    section 5.2: one model trained on all of the partition's units), else its units."""
    if method == "merged":
        return [ind_dir(partition)]
    return partition_unit_dirs(partition)


# merge.weights: user weights of the weighted method, replacing token counts.
USER_WEIGHTS = config["merge"].get("weights", {})


def token_files(method, partitions):
    """Token sidecars a merge reads: only weighted merges without user weights need them."""
    if method != "weighted" or USER_WEIGHTS:
        return []
    return [f"{shard('train', PARTITIONS[p], p)}.json" for p in partitions]


def get_merge_inputs(wildcards):
    members = mmconfig.mixture_members(wildcards.mixture)
    dirs = [d for p in members for d in merge_dirs(wildcards.method, p)]
    files = [f"{d}/model.safetensors" for d in dirs]
    return files + token_files(wildcards.method, members)


def model_flags(method, partitions):
    """--model (and, for weighted merges, --tokens or --weight) flags of merge.py and engine.py."""
    flags = [f"--model {p}={d}" for p in partitions for d in merge_dirs(method, p)]
    if method == "weighted" and USER_WEIGHTS:
        flags.extend(f"--weight {p}={USER_WEIGHTS.get(p, 1)}" for p in partitions)
    elif method == "weighted":
        flags.extend(
            f"--tokens {p}={shard('train', PARTITIONS[p], p)}.json" for p in partitions
        )
    return " ".join(flags)


def merge_flags(wildcards):
    return model_flags(wildcards.method, mmconfig.mixture_members(wildcards.mixture))


# --- evaluation -----------------------------------------------------------------------

# Sampling and batching flags shared by evaluate.py and engine.py: the same documents.
EVAL_FLAGS = (
    f"--max-docs {config['eval']['max_docs']} --batch-size {config['eval']['batch_size']}"
    f" --seed {config['random_seed']}"
)


def ood_domains():
    """Domain flags (NAME:KIND:MAX_TOKENS:PREFIX) of every OOD set."""
    ev = config["eval"]
    out = []
    for name, spec in ev["ood"].items():
        prefix = (
            shard("heldout", "seed", "seed")
            if "seed_heldout" in spec["load"]
            else shard("heldout", "ood", name)
        )
        out.append(f"{name}:ood:{ev['max_tokens']}:{prefix}")
    return out


# Computed once: at paper scale every evaluation job asks for them.
OOD_DOMAINS = ood_domains()


def eval_domains(partitions):
    """Domain flags: every OOD set, plus the held-out sets of `partitions`."""
    cap = config["eval"]["max_tokens_id"]
    return OOD_DOMAINS + [
        f"{p}:id:{cap}:{shard('heldout', PARTITIONS[p], p)}" for p in partitions
    ]


def domain_flags(partitions):
    return " ".join(f"--domain {d}" for d in eval_domains(partitions))


def domain_files(partitions):
    """Each domain's shard sidecar (.json) only: it is written last and holds the sha256
    of the .bin and .idx, so it changes exactly when they do. One input file per domain
    instead of three matters at paper scale, where every unit model is scored on every
    partition's held-out set (128 x 137 domains)."""
    return [f"{d.split(':', 3)[3]}.json" for d in eval_domains(partitions)]


# --- engine batches -------------------------------------------------------------------


def batch_mixtures(wildcards):
    batch = f"{wildcards.anchor}/{wildcards.chunk}"
    if batch not in BATCHES:
        raise WorkflowError(
            f"no engine batch {batch} in this study: batches are {', '.join(BATCHES)}"
        )
    return BATCHES[batch]


def batch_partitions(wildcards):
    """Partitions of a batch's mixtures, each once, in order of first appearance."""
    mixtures = batch_mixtures(wildcards)
    return list(dict.fromkeys(p for m in mixtures for p in mmconfig.mixture_members(m)))


def get_engine_inputs(wildcards):
    """Models of every partition of the batch, token sidecars, evaluation shards."""
    partitions = batch_partitions(wildcards)
    files = [
        f"{d}/model.safetensors"
        for p in partitions
        for d in merge_dirs(wildcards.method, p)
    ]
    return files + token_files(wildcards.method, partitions) + domain_files(partitions)


def engine_flags(wildcards):
    """The batch's mixtures, the unit models they need and every domain they are scored on."""
    partitions = batch_partitions(wildcards)
    mixtures = batch_mixtures(wildcards)
    return " ".join(
        [
            model_flags(wildcards.method, partitions),
            " ".join(f"--mixture {m}" for m in mixtures),
            domain_flags(partitions),
        ]
    )


def ind_eval_csv(partition):
    if mmconfig.units(config, partition) == 1:
        return f"results/ppl/unit/{partition}/0.csv"
    return f"results/ppl/ind/{partition}.csv"


# The ind models' own scores (proxies mean_ind and ind_id) are judged against seq models,
# the small ones or a size transfer's large ones. A proxies-only study trains and scores
# them only to rank by one of those proxies: for a several-unit partition an ind model
# costs as much training as all its units.
IND_PROXIES = ("mean_ind", "ind_id")
SCORE_IND = (
    bool(SEQ_MIXTURES)
    or bool(TRANSFER_MIXTURES)
    or config["analysis"]["rank_by"] in IND_PROXIES
)


def all_ppl_csvs():
    """Every per-model perplexity CSV the analysis (or, proxies only, the ranking) reads."""
    out = ["results/ppl/seed/seed.csv"]
    if SCORE_IND:
        out.extend(ind_eval_csv(p) for p in PARTITIONS)
    out.extend(f"results/ppl/seq/{m}.csv" for m in SEQ_MIXTURES)
    out.extend(
        f"results/ppl/merged/{method}/{batch}.csv"
        for method in config["merge"]["methods"]
        for batch in BATCHES
    )
    return out


def transfer_ppl_csvs():
    """The analysis inputs of the size transfer: every CSV of the small study but its seq
    models', which the large seq models replace as the truth."""
    small_seq = {f"results/ppl/seq/{m}.csv" for m in SEQ_MIXTURES}
    out = [f for f in all_ppl_csvs() if f not in small_seq]
    return out + [f"results/ppl/seq_large/{m}.csv" for m in TRANSFER_MIXTURES]


# What `all` adds for a size-transfer study (rules/transfer.smk, included only then).
TRANSFER_TARGETS = ["results/transfer/correlations.csv"] if TRANSFER else []


# --- analysis -------------------------------------------------------------------------

# Proxies the analysis scores: one per merge method the study runs, then the ind-model
# baselines. Each gets its own seq-vs-proxy figure, so the figure files follow config.
PROXIES = list(config["merge"]["methods"]) + ["mean_ind", "ind_id"]
BENCH = "results/benchmarks"


def benchmark_files():
    """Benchmark TSVs of every training and evaluation job of this study (the ledger's
    input). Listed from config, not globbed, so files of an earlier study never count.
    """
    out = [f"{BENCH}/train/seed.tsv", f"{BENCH}/evaluate/seed.tsv"]
    for p, source in PARTITIONS.items():
        n = mmconfig.units(config, p)
        out.extend(f"{BENCH}/train/unit/{source}/{p}/{u}.tsv" for u in range(n))
        if n == 1:
            out.append(f"{BENCH}/evaluate/unit/{p}/0.tsv")
        else:
            out.extend([f"{BENCH}/train/ind/{p}.tsv", f"{BENCH}/evaluate/ind/{p}.tsv"])
    out.extend(f"{BENCH}/train/seq/{m}.tsv" for m in SEQ_MIXTURES)
    out.extend(f"{BENCH}/evaluate/seq/{m}.tsv" for m in SEQ_MIXTURES)
    out.extend(
        f"{BENCH}/evaluate/merged/{method}/{batch}.tsv"
        for method in config["merge"]["methods"]
        for batch in BATCHES
    )
    return out


def sidecar_files():
    """Sidecars (tokens trained, ranks) of every model this study trains."""
    dirs = ["work/models/seed"]
    for p in PARTITIONS:
        dirs.extend(partition_unit_dirs(p))
        if mmconfig.units(config, p) > 1:
            dirs.append(ind_dir(p))
    dirs.extend(f"work/models/seq/{m}" for m in SEQ_MIXTURES)
    return [f"{d}/mergemix.json" for d in dirs]


def study_flags():
    """n, k, the fixed partitions and the studied mixtures: the ledger projects to every
    candidate, C(n - fixed, k - fixed)."""
    return (
        f"--partitions {len(PARTITIONS)} --k {config['mixtures']['k']}"
        f" --fixed {len(mmconfig.fixed_partitions(config))} --mixtures {len(MIXTURES)}"
    )
