"""Configuration: schema validation, the study's nouns, and typed sections.

The workflow's `config.yaml` is checked twice before any job runs: against the JSON
schema shipped beside this module (unknown keys, types, bounds), then for meaning
(unique partition names, mixtures that name real partitions, a sample that fits).
Every failure is one `ConfigError` line that names the key and the offending value.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import math
import os
import random
import re
from collections.abc import Hashable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jsonschema
import yaml

MIXTURE_SEP = "+"
# Domain names the analysis derives: no partition or evaluation set may take them.
IN_DOMAIN = "in-domain"  # union of a mixture's held-out sets
OOD_MEAN = "ood-mean"  # summary row of correlations.csv: mean r over OOD domains
RESERVED_DOMAINS = (IN_DOMAIN, OOD_MEAN)
# Candidate mixtures listed before sampling; beyond this, a sample is drawn without the list.
MAX_LISTED_MIXTURES = 2_000_000
# The folder the workflow writes (and clears before rewriting a job's outputs).
WORK_DIR = "work"


def _is_integer(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 2.0 as an integer; the jobs would get "2.0" on their command line.
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


# A data file given by URL (hf://, s3://, https://...): read by `datasets`, not a local file.
REMOTE_FILE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class ConfigError(ValueError):
    """A config.yaml problem, phrased for the user: the key, the value, what to do."""


def local_data_files(entries: list[str] | None, where: str) -> list[str]:
    """The local files a load's `data_files` name, in order, each pattern expanded to
    the files it matches (glob, `**` recursive, hidden files left out). URLs are
    skipped: `datasets` reads them. Relative paths start from the working directory.
    A ConfigError names `where` and the entry that gives no file."""
    files: list[str] = []
    for entry in entries or []:
        if REMOTE_FILE.match(entry):
            continue
        if set("*?[") & set(entry):
            matches = sorted(f for f in glob.glob(entry, recursive=True) if os.path.isfile(f))
            if not matches:
                raise ConfigError(f"{where}: pattern {entry!r} matches no file under {os.getcwd()}; fix the pattern")
            files.extend(matches)
        elif os.path.isdir(entry):
            raise ConfigError(f"{where}: {entry!r} is a folder; list its files or a pattern ('{entry}/*.jsonl')")
        elif not os.path.isfile(entry):
            raise ConfigError(
                f"{where}: data file {entry!r} does not exist under {os.getcwd()}; fix the path or restore the file"
            )
        else:
            files.append(entry)
    return files


def check_data_files(config: dict[str, Any]) -> dict[str, list[str]]:
    """Every local data file a load names exists, checked before any job is planned.
    (Snakemake alone lets a finished study stand, "Nothing to be done", when the path
    to its data breaks, as it tolerates missing inputs of up-to-date outputs.) Returns
    each section's local files, patterns expanded, by key: sources.<name>, seed and
    eval.ood.<name>."""
    sections = {f"sources.{name}": entry for name, entry in config["sources"].items()}
    sections["seed"] = config["seed"]
    sections.update({f"eval.ood.{name}": entry for name, entry in config["eval"]["ood"].items()})
    return {key: local_data_files(entry["load"].get("data_files"), f"{key}.load.data_files")
            for key, entry in sections.items()}


def schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (shipped inside the package)."""
    text = resources.files("mergemix").joinpath("config.schema.yaml").read_text()
    return yaml.safe_load(text)


def _key_path(path: Any) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        key = f"{where}.{extra[0]}" if extra and where != "<top level>" else (extra[0] if extra else where)
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"unknown key '{key}' in config{hint}"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        key = missing if where == "<top level>" else f"{where}.{missing}"
        return f"missing key '{key}' in config: add it (see the commented config.yaml)"
    if "propertyNames" in error.schema_path and not isinstance(error.instance, str):
        return (f"invalid name {error.instance!r} under '{where}': YAML read this name as a "
                f"{type(error.instance).__name__}, not text; put it in quotes as written")
    if "propertyNames" in error.schema_path:  # jsonschema reports the name's own check (pattern, not)
        return (f"invalid name {error.instance!r} under '{where}': names are letters, digits, _ . and -, "
                "do not start with a dot, and a source is not named 'seed' or 'ood'")
    if error.validator == "type" and isinstance(error.instance, float) and "integer" in str(error.validator_value):
        return (f"invalid value for '{where}': {error.instance!r} is not a whole number; write it without a "
                "decimal point or exponent (YAML reads 1.0e+5 as a float)")
    if error.validator == "oneOf" and where.endswith("load"):
        return f"'{where}' must have exactly one of 'demo', 'path' or 'seed_heldout' (got {error.instance!r})"
    return f"invalid value for '{where}': {error.message}"


def validate(config: dict[str, Any]) -> None:
    """Raise ConfigError for the first schema or semantic problem in `config`."""
    spec = schema()
    validator = _Validator(spec)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(list(e.absolute_path)), str(e.absolute_path)))
    if errors:
        # Report the shallowest error: a typo'd key explains the deeper ones it causes.
        raise ConfigError(_describe(errors[0]))
    _check_semantics(config, spec["properties"]["merge"]["properties"]["methods"]["items"]["enum"])


#: the keys each kind of `load` reads (the schema lets exactly one kind through)
LOAD_KEYS = {"demo": {"demo"}, "path": {"path", "data_files", "name", "split"}, "seed_heldout": {"seed_heldout"}}


def _check_load_keys(where: str, load: dict[str, Any]) -> None:
    """Refuse a key the chosen kind of load would ignore (`split` beside `demo`)."""
    kind = next(k for k in LOAD_KEYS if k in load)
    extra = sorted(set(load) - LOAD_KEYS[kind])
    if extra:
        raise ConfigError(f"'{where}.{extra[0]}' is not read with '{kind}' ({', '.join(sorted(LOAD_KEYS['path']))} "
                          "go with 'path'): remove it")


def _check_semantics(config: dict[str, Any], merge_methods: list[str]) -> None:
    owner: dict[str, str] = {}
    for source, spec in config["sources"].items():
        for partition in spec["partitions"]:
            if partition in owner:
                raise ConfigError(
                    f"duplicate partition name '{partition}' in sources.{owner[partition]}.partitions "
                    f"and sources.{source}.partitions: partition names must be unique across sources"
                )
            owner[partition] = source
    clash = set(owner) & set(config["eval"]["ood"])
    if clash:
        raise ConfigError(f"eval.ood name '{sorted(clash)[0]}' is also a partition name: rename one of them")
    for name in [*owner, *config["eval"]["ood"]]:
        if name in RESERVED_DOMAINS:
            raise ConfigError(f"'{name}' is reserved for a derived row of the analysis: rename that partition or eval.ood set")
    for source, spec in config["sources"].items():
        if not spec["partition_by"] and len(spec["partitions"]) > 1:
            raise ConfigError(
                f"sources.{source}.partition_by is empty, so the whole source is one partition, but "
                f"sources.{source}.partitions lists {len(spec['partitions'])} ({', '.join(spec['partitions'])}): "
                "name the metadata columns to partition on, or list one partition"
            )
        if "seed_heldout" in spec["load"]:
            raise ConfigError(f"sources.{source}.load: seed_heldout is only valid for eval.ood sets")
    if "seed_heldout" in config["seed"]["load"]:
        raise ConfigError("seed.load: seed_heldout is only valid for eval.ood sets")
    for name, spec in config["eval"]["ood"].items():
        column = spec.get("text_column", config["seed"]["text_column"])
        if "seed_heldout" in spec["load"] and column != config["seed"]["text_column"]:
            raise ConfigError(
                f"eval.ood.{name}.text_column is '{column}', but a seed_heldout set is read with the seed's "
                f"text column ('{config['seed']['text_column']}'): remove the key"
            )
    loads = {f"sources.{source}.load": spec["load"] for source, spec in config["sources"].items()}
    loads["seed.load"] = config["seed"]["load"]
    loads.update({f"eval.ood.{name}.load": spec["load"] for name, spec in config["eval"]["ood"].items()})
    for where, load in loads.items():
        _check_load_keys(where, load)
    for i, mixture in enumerate(config["mixtures"]["include"]):
        for partition in mixture:
            if partition not in owner:
                raise ConfigError(
                    f"mixtures.include[{i}] names unknown partition '{partition}': "
                    f"known partitions are {', '.join(sorted(owner))}"
                )
        if len(set(mixture)) != len(mixture):
            raise ConfigError(f"mixtures.include[{i}] repeats a partition: {mixture}")
        if len(mixture) != config["mixtures"]["k"]:
            raise ConfigError(
                f"mixtures.include[{i}] has {len(mixture)} partition(s) but mixtures.k is {config['mixtures']['k']}: "
                "every mixture of a study has k partitions, so that seq models and proxies compare like with like"
            )
    decontaminate = config["decontaminate"]
    if decontaminate["enabled"]:
        if not decontaminate["against"]:
            raise ConfigError("decontaminate.against is empty: list the eval.ood sets to check against, or set decontaminate.enabled: false")
        for name in decontaminate["against"]:
            if name not in config["eval"]["ood"]:
                raise ConfigError(
                    f"decontaminate.against names '{name}', which is not an eval.ood set: known sets are "
                    f"{', '.join(sorted(config['eval']['ood'])) or 'none'}"
                )
    k = config["mixtures"]["k"]
    if k > len(owner):
        raise ConfigError(f"mixtures.k is {k} but only {len(owner)} partitions are configured: lower mixtures.k")
    _check_fixed(config, owner)
    fixed = len(fixed_partitions(config))
    candidates = math.comb(len(owner) - fixed, k - fixed)
    sample = config["mixtures"]["sample"]
    if candidates > MAX_LISTED_MIXTURES and (sample is None or sample > MAX_LISTED_MIXTURES):
        raise ConfigError(
            f"mixtures.k {k} over {len(owner)} partitions gives {candidates:,} candidate mixtures, more than a "
            f"study can score ({MAX_LISTED_MIXTURES:,}): set mixtures.sample to at most that, or lower mixtures.k"
        )
    for partition in config["merge"].get("weights", {}):
        if partition not in owner:
            raise ConfigError(
                f"merge.weights names unknown partition '{partition}': known partitions are {', '.join(sorted(owner))}"
            )
    if not math.isfinite(sum(config["merge"].get("weights", {}).values())):
        raise ConfigError("merge.weights add up to more than a float can hold: scale them down (only their ratios matter)")
    for key, proxy in config["analysis"].items():  # a merge method named here must be scored
        if proxy in merge_methods and proxy not in config["merge"]["methods"]:
            raise ConfigError(
                f"analysis.{key} is '{proxy}', a merge method that merge.methods ({', '.join(config['merge']['methods'])}) "
                "does not score: add it there or choose one of those, mean_ind or ind_id"
            )
    _check_not_own_output(config)
    _check_model(config["model"], "model")
    _check_phases(config["train"], "train")
    _check_engine(config)
    _check_warmup(config)
    _check_micro_batch(config)
    transfer = config.get("transfer")
    if transfer:
        _check_model(transfer["model"], "transfer.model")
        _check_phases(transfer, "transfer")


def _check_fixed(config: dict[str, Any], owner: dict[str, str]) -> None:
    """mixtures.fixed: known partitions, fewer than k, each in every `include` mixture."""
    spec = config["mixtures"]
    fixed = fixed_partitions(config)
    for partition in fixed:
        if partition not in owner:
            raise ConfigError(
                f"mixtures.fixed names unknown partition '{partition}': known partitions are {', '.join(sorted(owner))}"
            )
    if not fixed:
        return
    if len(fixed) >= spec["k"]:
        raise ConfigError(
            f"mixtures.fixed lists {len(fixed)} partition(s) but mixtures.k is {spec['k']}: "
            "raise k so that every mixture also has a partition that varies"
        )
    for i, mixture in enumerate(spec["include"]):
        missing = [p for p in fixed if p not in mixture]
        if missing:
            raise ConfigError(
                f"mixtures.include[{i}] lacks the fixed partition '{missing[0]}': every studied mixture "
                "contains mixtures.fixed, so add it or drop the mixture"
            )


def _check_not_own_output(config: dict[str, Any]) -> None:
    """A model or tokenizer to import must not lie in work/: the job that imports it would
    first have Snakemake delete its own outputs there, the very files it reads."""
    work = os.path.realpath(WORK_DIR)
    transfer = config.get("transfer") or {}
    for key, value in (("seed.pretrained", config["seed"].get("pretrained")),
                       ("tokenizer.name", config["tokenizer"].get("name")),
                       ("transfer.pretrained", transfer.get("pretrained"))):
        if value and os.path.commonpath([work, os.path.realpath(value)]) == work:
            raise ConfigError(
                f"{key} '{value}' is inside {WORK_DIR}/, which the workflow writes and clears before rewriting: "
                f"copy it out first (e.g. cp -r {value} imported/) and name the copy"
            )


def _check_model(model: dict[str, Any], key: str) -> None:
    if model["hidden_size"] % model["num_heads"]:
        raise ConfigError(
            f"{key}.hidden_size ({model['hidden_size']}) must be divisible by {key}.num_heads ({model['num_heads']})"
        )


def _check_phases(section: dict[str, Any], key: str) -> None:
    for phase in ("seed_phase", "continued"):
        lr, min_lr = section[phase]["lr"], section[phase]["min_lr"]
        if min_lr > lr:
            raise ConfigError(f"{key}.{phase}.min_lr ({min_lr}) is larger than {key}.{phase}.lr ({lr})")


def _check_warmup(config: dict[str, Any]) -> None:
    """A warm-up that takes a whole phase (no step at or decaying from lr) is refused.

    Continued pretraining is checked against one unit, its shortest run (ind and seq
    models of several units take more steps with the same warm-up); a size transfer's
    continued phase trains seq models only, of k units or more, and is not checked.
    """
    train, transfer = config["train"], config.get("transfer")
    # (phase key, phase, its tokens, their key, context length) of every phase trained here
    phases = []
    if not config["seed"].get("pretrained"):  # an imported seed brings a context length unknown here
        context = config["model"]["context_length"]
        phases += [("train.continued", train["continued"], train["unit_tokens"], "train.unit_tokens", context),
                   ("train.seed_phase", train["seed_phase"], train["seed_phase"]["tokens"], "train.seed_phase.tokens", context)]
    if transfer and not transfer["pretrained"]:  # the large model keeps model.context_length
        phases.append(("transfer.seed_phase", transfer["seed_phase"], transfer["seed_phase"]["tokens"],
                       "transfer.seed_phase.tokens", config["model"]["context_length"]))
    for key, phase, tokens, tokens_key, context in phases:
        steps = ((tokens - 1) // context) // phase["batch_size"]  # as train.windows cuts them
        if steps and phase["warmup_steps"] >= steps:
            raise ConfigError(
                f"{key}.warmup_steps ({phase['warmup_steps']}) is not shorter than the phase: {tokens_key} gives "
                f"{steps} steps of {key}.batch_size x model.context_length, so the warm-up would take all of "
                f"them and none would train at or decay from {key}.lr; lower the warm-up or raise the tokens"
            )


def _check_micro_batch(config: dict[str, Any]) -> None:
    """Every phase's batch is a whole number of micro-batches (a job of several processes
    checks its share when it starts)."""
    micro = config["train"].get("micro_batch")
    if micro is None:
        return
    phases = [("train.seed_phase", config["train"]["seed_phase"]), ("train.continued", config["train"]["continued"])]
    if config.get("transfer"):
        phases += [("transfer.seed_phase", config["transfer"]["seed_phase"]),
                   ("transfer.continued", config["transfer"]["continued"])]
    for key, phase in phases:
        if phase["batch_size"] % micro:
            raise ConfigError(f"{key}.batch_size ({phase['batch_size']}) is not a multiple of train.micro_batch ({micro}): "
                              "a batch is accumulated over whole micro-batches; choose a divisor of every batch_size")


def _check_engine(config: dict[str, Any]) -> None:
    """Settings every training job would fail on after the seed: refused before it."""
    train = config["train"]
    if train["precision"] == "bf16" and train["zero_stage"] == 0:
        raise ConfigError(
            "train.precision bf16 needs train.zero_stage 1 or 2: DeepSpeed's stage-0 bf16 optimizer keeps "
            "AdamW's moments where they cannot be carried from the seed into continued pretraining"
        )
    # (tokens key, tokens, batch-size key, batch size) of every phase that trains: the
    # small models' and, with `transfer`, the large seed's and large seq models'.
    budgets = [("train.unit_tokens", train["unit_tokens"], "train.continued.batch_size", train["continued"]["batch_size"]),
               ("train.seed_phase.tokens", train["seed_phase"]["tokens"], "train.seed_phase.batch_size",
                train["seed_phase"]["batch_size"])]
    seq_batches = [("train.continued.batch_size", train["continued"]["batch_size"])]
    transfer = config.get("transfer")
    if transfer:
        budgets.append(("train.unit_tokens", train["unit_tokens"], "transfer.continued.batch_size",
                        transfer["continued"]["batch_size"]))
        if not transfer["pretrained"]:  # an imported large seed is not trained here
            budgets.append(("transfer.seed_phase.tokens", transfer["seed_phase"]["tokens"],
                            "transfer.seed_phase.batch_size", transfer["seed_phase"]["batch_size"]))
        seq_batches.append(("transfer.continued.batch_size", transfer["continued"]["batch_size"]))
    if config["seed"].get("pretrained"):  # a pretrained seed brings its own context length: unknown here
        budgets = []
    context = config["model"]["context_length"]
    for key, tokens, batch_key, batch in budgets:
        if tokens <= batch * context:
            raise ConfigError(
                f"{key} is {tokens}, fewer than one batch of {batch_key} x model.context_length "
                f"({batch} x {context}) + 1 tokens: raise {key} or lower the batch size"
            )
    processes = ranks(config, "seq")
    for key, batch in seq_batches:
        if batch % processes:
            raise ConfigError(
                f"{key} ({batch}) cannot be split over the {processes} processes of a seq job "
                f"(resources.seq.{'gpu' if config['resources']['seq']['gpu'] > 0 else 'processes'}): "
                f"make it a multiple of {processes}"
            )
    # Only seq jobs start several ranks; any other job runs one process on one device, and
    # GPUs or processes asked for beyond that would sit idle.
    for kind, group in config["resources"].items():
        if kind == "seq":
            continue
        for key in ("gpu", "processes"):
            if group.get(key, 0) > 1:
                raise ConfigError(
                    f"resources.{kind}.{key} is {group[key]}: a {kind} job runs one process on one device, "
                    f"so the rest would sit idle; set it to 1 (only resources.seq trains data-parallel)"
                )


def ranks(config: dict[str, Any], kind: str) -> int:
    """Data-parallel training processes of a `resources.<kind>` job: one per GPU, else `processes` (default 1)."""
    group = config["resources"][kind]
    return group["gpu"] if group["gpu"] > 0 else group.get("processes", 1)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; overriding its keys is fine
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the schema names a key that is not text
            if key in seen:
                raise ConfigError(
                    f"{key_node.start_mark.name} line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                    "in the same mapping, and only the last would count: keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def check_unique_keys(path: str) -> None:
    """Refuse a config file that gives a key twice in one mapping (a copied partition line)."""
    try:
        with open(path, encoding="utf-8") as fh:
            yaml.load(fh, Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError:
        return  # not this check's business: reading the file for the config reports it


def load(path: str) -> dict[str, Any]:
    """Read and validate a config file."""
    check_unique_keys(path)
    try:
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    validate(config)
    return config


# --- the study's nouns --------------------------------------------------------------


def partitions(config: dict[str, Any]) -> dict[str, str]:
    """Partition name -> source name, in config order."""
    return {p: s for s, spec in config["sources"].items() for p in spec["partitions"]}


def units(config: dict[str, Any], partition: str) -> int:
    """Number of base units of a partition.

    Looks through the sources instead of building `partitions(config)`: the workflow asks
    once per job, and at 128 partitions and thousands of jobs that rebuild was a
    measurable share of planning time.
    """
    for spec in config["sources"].values():
        if partition in spec["partitions"]:
            return spec["partitions"][partition]
    raise KeyError(partition)


def mixture_id(members: list[str] | tuple[str, ...]) -> str:
    """Stable, readable id: sorted partition names joined by '+'."""
    return MIXTURE_SEP.join(sorted(members))


def mixture_members(mixture: str) -> list[str]:
    return mixture.split(MIXTURE_SEP)


def fixed_partitions(config: dict[str, Any]) -> list[str]:
    """Partitions every mixture contains (`mixtures.fixed`, absent in older configs)."""
    return list(config["mixtures"].get("fixed", []))


def mixtures(config: dict[str, Any]) -> list[str]:
    """The studied mixtures: a seeded sample (or all) of k-subsets plus `include`.

    With `mixtures.fixed`, every candidate is the fixed partitions plus a
    (k - len(fixed))-subset of the others (paper A.5: one partition in every mixture,
    the other varies). The sample depends only on the partition names, k, fixed, sample
    and the seed, so adding a partition later changes the sample; list mixtures under
    `include` to pin them.
    """
    spec = config["mixtures"]
    fixed = fixed_partitions(config)
    names = sorted(p for p in partitions(config) if p not in fixed)
    free = spec["k"] - len(fixed)
    rng = random.Random(config["random_seed"])
    if math.comb(len(names), free) > MAX_LISTED_MIXTURES:
        # Too many to list (validate made sure a sample is asked for): draw k-subsets
        # until the sample is complete, instead of sampling from a list of them all.
        picked: set[str] = set()
        while len(picked) < spec["sample"]:
            picked.add(mixture_id([*fixed, *rng.sample(names, free)]))
        subsets = sorted(picked)
    else:
        subsets = [mixture_id([*fixed, *c]) for c in itertools.combinations(names, free)]
        if spec["sample"] is not None and spec["sample"] < len(subsets):
            subsets = sorted(rng.sample(subsets, spec["sample"]))
    chosen = dict.fromkeys(subsets)
    for members in spec["include"]:
        chosen[mixture_id(members)] = None
    return list(chosen)


def _draw(seed: int, mixture: str) -> int:
    """A mixture's seeded draw: depends on its own id and the seed only."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{mixture}".encode(), digest_size=8).digest(), "big")


def seq_mixtures(config: dict[str, Any], studied: list[str] | None = None) -> list[str]:
    """The studied mixtures that get a seq model (the ground truth), in study order.

    None when `mixtures.seq` is false; all when `mixtures.seq_sample` is null; otherwise
    the `seq_sample` mixtures with the smallest seeded hash of their id, plus every
    mixture under `include`. Ranking by a per-mixture hash (not random.sample over the
    list) keeps the sample uniform as the study grows while replacing only the members
    a new mixture outranks, so adding a partition plans few new seq models.
    """
    spec = config["mixtures"]
    studied = mixtures(config) if studied is None else studied
    if not spec["seq"]:
        return []
    return _ranked_sample(config, studied, spec["seq_sample"])


def _ranked_sample(config: dict[str, Any], studied: list[str], size: int | None) -> list[str]:
    """The `size` studied mixtures of smallest seeded hash, plus `include`; all for None."""
    if size is None or size >= len(studied):
        return list(studied)
    ranked = sorted(studied, key=lambda m: (_draw(config["random_seed"], m), m))
    chosen = set(ranked[:size]) | {mixture_id(m) for m in config["mixtures"]["include"]}
    return [m for m in studied if m in chosen]


def transfer_mixtures(config: dict[str, Any], studied: list[str] | None = None) -> list[str]:
    """The mixtures that get a large seq model (paper 5.4 / A.6 size transfer).

    None without `transfer`. Drawn by the same per-mixture hash as `seq_mixtures`, so
    with transfer.seq_sample <= mixtures.seq_sample every large seq model has a small
    one beside it, and the two sizes can be compared on the same mixtures.
    """
    transfer = config.get("transfer")
    if not transfer:
        return []
    studied = mixtures(config) if studied is None else studied
    return _ranked_sample(config, studied, transfer["seq_sample"])


def mixture_batches(config: dict[str, Any], studied: list[str] | None = None) -> dict[str, list[str]]:
    """Studied mixtures grouped into engine jobs: batch id "ANCHOR/CHUNK" -> mixture ids.

    Snakemake reruns a job whose inputs or parameters changed, so a batch must keep its
    mixtures when the study grows. The key is the mixture's *anchor*, its member listed
    last in the config (sources in order, then partitions in order):
    - adding a partition never changes an existing mixture's anchor (the old partitions
      keep their relative order), and
    - a partition appended at the end anchors every new mixture (each contains it and it
      is the latest), so only new batches are planned; old ones keep inputs and outputs.
    (A partition inserted mid-list also spares the anchors before it; the batches of
    later anchors gain its mixtures and rerun.) A stable hash into N buckets would not do:
    new mixtures would land in nearly every bucket and rerun them all.
    An anchor's mixtures, in config order of their members, are cut into chunks of
    `merge.mixtures_per_job`; a chunk holds at most 1 + (k - 1) x mixtures_per_job
    partitions' unit models, which bounds one job's memory.
    """
    studied = mixtures(config) if studied is None else studied
    rank = {p: i for i, p in enumerate(partitions(config))}
    by_anchor: dict[str, list[tuple[list[int], str]]] = {}
    for mixture in studied:
        members = mixture_members(mixture)
        anchor = max(members, key=rank.__getitem__)
        # Within an anchor, order by the members' config positions, latest first.
        by_anchor.setdefault(anchor, []).append((sorted((rank[p] for p in members), reverse=True), mixture))
    size = config["merge"]["mixtures_per_job"]
    batches: dict[str, list[str]] = {}
    for anchor in sorted(by_anchor, key=rank.__getitem__):
        ordered = [m for _, m in sorted(by_anchor[anchor])]
        for chunk, start in enumerate(range(0, len(ordered), size)):
            batches[f"{anchor}/{chunk}"] = ordered[start : start + size]
    return batches


# --- typed sections used by the training code ----------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT-NeoX built from scratch for the seed."""

    hidden_size: int = 128  # width of the residual stream
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads; hidden_size % num_heads == 0
    intermediate_size: int = 512  # MLP width
    context_length: int = 256  # tokens per training / evaluation window
    vocab_size: int | None = None  # None: the tokenizer's size rounded up to 64

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase's schedule: linear warm-up, then cosine decay to min_lr."""

    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    tokens: int | None = None  # seed phase only: tokens drawn from the seed corpus

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is larger than lr ({self.lr})")


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and engine settings shared by all phases."""

    precision: str = "fp32"  # fp32 on CPUs; bf16 on GPUs
    zero_stage: int = 0  # DeepSpeed ZeRO stage
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 50  # steps between resume states (0: none)
    micro_batch: int | None = None  # windows per forward pass on a rank (None: its whole share of a batch)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be fp32 or bf16, got {self.precision!r}")
        if self.micro_batch is not None and (isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int)
                                             or self.micro_batch < 1):
            raise ValueError(f"train.micro_batch must be a whole number >= 1 or null, got {self.micro_batch!r}")
