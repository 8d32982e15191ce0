import copy

import pytest

from mergemix import config as mc
from tests.conftest import REPO


@pytest.fixture()
def shipped():
    return mc.load(str(REPO / "config.yaml"))


def test_shipped_config_validates_and_plans(shipped):
    mixtures = mc.mixtures(shipped)
    assert len(mixtures) == shipped["mixtures"]["sample"]
    parts = mc.partitions(shipped)
    for m in mixtures:
        members = mc.mixture_members(m)
        assert len(members) == shipped["mixtures"]["k"] and set(members) <= set(parts)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["train"].update(lerning_rate=1), "unknown key 'train.lerning_rate'"),
        (lambda c: c.update(colour="red"), "unknown key 'colour'"),
        (lambda c: c["eval"].pop("max_docs"), "missing key 'eval.max_docs'"),
        (lambda c: c["model"].update(hidden_size="wide"), "'model.hidden_size'"),
        (lambda c: c["mixtures"].update(k=12), "mixtures.k is 12"),
        (lambda c: c["mixtures"].update(include=[["1850s", "nope"]]), "unknown partition 'nope'"),
        (lambda c: c["model"].update(num_heads=3), "divisible by model.num_heads"),
        (lambda c: c["sources"].update(other=copy.deepcopy(c["sources"]["sotu"])), "duplicate partition name"),
        (lambda c: c["sources"]["sotu"]["partitions"].update({"bad/name": 1}), "invalid name 'bad/name' under 'sources.sotu.partitions'"),
        (lambda c: c["sources"]["sotu"].update(load={"demo": "sotu", "path": "json"}), "exactly one of"),
        (lambda c: c["sources"]["sotu"]["partitions"].update({"..": 1}), "invalid name '..' under 'sources.sotu.partitions'"),
        (lambda c: c["sources"]["sotu"]["partitions"].update({"ood-mean": 1}), "'ood-mean' is reserved"),
        (lambda c: c["eval"]["ood"].update({"in-domain": c["eval"]["ood"]["pydoc"]}), "'in-domain' is reserved"),
        (lambda c: c.update(random_seed=2**64), "'random_seed'"),
        (lambda c: c["train"].update(zero_stage=3), "'train.zero_stage'"),
        (lambda c: c["train"].update(precision="bf16"), "train.precision bf16 needs train.zero_stage 1 or 2"),
        (lambda c: c["train"].update(unit_tokens=10), "train.unit_tokens is 10, fewer than one batch"),
        (lambda c: c["train"]["seed_phase"].update(tokens=100), "train.seed_phase.tokens is 100"),
        (lambda c: c["resources"]["seq"].update(processes=3), "cannot be split over the 3 processes"),
        (lambda c: c["resources"]["train"].update(gpu=2), "resources.train.gpu is 2: a train job runs one process"),
        (lambda c: c["resources"]["seed"].update(processes=4), "resources.seed.processes is 4"),
        (lambda c: c["merge"].update(weights={"1850s": 1e308, "1870s": 1e308}), "merge.weights add up"),
        (lambda c: c["eval"]["ood"]["pydoc"].pop("text_column"), "missing key 'eval.ood.pydoc.text_column'"),
        (lambda c: c["eval"]["ood"]["shakespeare"].update(text_column="body"),
         "eval.ood.shakespeare.text_column is 'body', but a seed_heldout set is read with the seed's text column"),
    ],
)
def test_bad_config_names_the_key(shipped, mutate, expected):
    broken = copy.deepcopy(shipped)
    mutate(broken)
    with pytest.raises(mc.ConfigError) as err:
        mc.validate(broken)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda t: t["seed_phase"].update(tokens=100), "transfer.seed_phase.tokens is 100, fewer than one batch"),
        (lambda t: t["continued"].update(batch_size=4096), "train.unit_tokens is 100000, fewer than one batch of transfer.continued.batch_size"),
        (lambda t: t["continued"].update(batch_size=3), "transfer.continued.batch_size (3) cannot be split over the 2 processes"),
        (lambda t: t["model"].update(num_heads=5), "divisible by transfer.model.num_heads"),
    ],
)
def test_bad_transfer_section_names_the_key(mutate, expected):
    # The size-transfer study's large seed and seq models get the checks the small ones get.
    broken = mc.load(str(REPO / "configs/study_5.4_size_transfer.yaml"))
    broken["resources"]["seq"].update(gpu=0, processes=2)
    broken["train"]["continued"]["batch_size"] = 8
    mutate(broken["transfer"])
    with pytest.raises(mc.ConfigError) as err:
        mc.validate(broken)
    assert expected in str(err.value)


def test_a_seed_heldout_set_needs_no_text_column(shipped):
    """It is read with the seed's; writing the same column is allowed (configs from before say so)."""
    edited = copy.deepcopy(shipped)
    edited["eval"]["ood"]["shakespeare"].pop("text_column", None)
    mc.validate(edited)
    edited["eval"]["ood"]["shakespeare"]["text_column"] = edited["seed"]["text_column"]
    mc.validate(edited)


def test_mixture_sample_is_seeded_and_include_is_added(shipped):
    cfg = copy.deepcopy(shipped)
    first = mc.mixtures(cfg)
    assert first == mc.mixtures(copy.deepcopy(cfg))
    cfg["random_seed"] = 1
    assert mc.mixtures(cfg) != first
    cfg["mixtures"].update(sample=None, include=[["1990s", "1830s", "1850s"]])
    everything = mc.mixtures(cfg)
    n = len(mc.partitions(cfg))
    assert len(everything) == n * (n - 1) // 2 + 1
    assert everything[-1] == "1830s+1850s+1990s"


def study(n_partitions: int, k: int = 2, per_job: int = 5, **mixtures) -> dict:
    """A config of `n_partitions` one-unit partitions studying every k-subset."""
    cfg = mc.load(str(REPO / "config.yaml"))
    cfg["sources"]["sotu"]["partitions"] = {f"p{i:02d}": 1 for i in range(n_partitions)}
    cfg["mixtures"].update({"k": k, "sample": None, "include": [], **mixtures})
    cfg["merge"]["mixtures_per_job"] = per_job
    return cfg


def test_a_sample_of_more_candidates_than_can_be_listed():
    # C(128, 5) = 264,566,400 candidates: drawn one by one, never listed
    cfg = study(128, k=5, sample=50)
    mc.validate(cfg)
    drawn = mc.mixtures(cfg)
    assert len(drawn) == len(set(drawn)) == 50
    assert all(len(mc.mixture_members(m)) == 5 for m in drawn)
    assert drawn == mc.mixtures(copy.deepcopy(cfg))  # seeded
    cfg["mixtures"]["fixed"] = ["p00"]  # with a fixed partition: it and 4 others
    assert all("p00" in mc.mixture_members(m) for m in mc.mixtures(cfg))
    cfg["mixtures"].update(fixed=[], sample=None)
    with pytest.raises(mc.ConfigError, match="264,566,400 candidate mixtures"):
        mc.validate(cfg)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_batches_cover_every_mixture_once_and_are_bounded(k):
    cfg = study(9, k=k, per_job=4)
    batches = mc.mixture_batches(cfg)
    flat = [m for ms in batches.values() for m in ms]
    assert sorted(flat) == sorted(mc.mixtures(cfg))
    order = list(mc.partitions(cfg))
    for batch, mixtures in batches.items():
        anchor, chunk = batch.split("/")
        assert 1 <= len(mixtures) <= 4 and chunk.isdigit()
        for m in mixtures:
            assert max(mc.mixture_members(m), key=order.index) == anchor
        members = {p for m in mixtures for p in mc.mixture_members(m)}
        assert len(members) <= 1 + (k - 1) * 4


def test_appending_a_partition_only_adds_batches():
    """The batching key keeps old batches' mixtures, hence their inputs and params."""
    before = mc.mixture_batches(study(12))
    grown = study(12)
    grown["sources"]["sotu"]["partitions"]["zz-new"] = 1
    after = mc.mixture_batches(grown)
    assert {b: after[b] for b in before} == before
    added = set(after) - set(before)
    assert added and all(b.startswith("zz-new/") for b in added)
    assert sum(len(after[b]) for b in added) == 12  # every new pair contains the new partition


def test_inserting_a_partition_spares_earlier_anchors():
    before = mc.mixture_batches(study(12))
    grown = study(12)
    parts = grown["sources"]["sotu"]["partitions"]
    grown["sources"]["sotu"]["partitions"] = {**{p: 1 for p in list(parts)[:6]}, "mid": 1,
                                              **{p: 1 for p in list(parts)[6:]}}
    after = mc.mixture_batches(grown)
    for batch, mixtures in before.items():
        if int(batch.split("/")[0][1:]) < 6:
            assert after[batch] == mixtures


def test_seq_sample_is_seeded_stable_and_keeps_include():
    assert mc.seq_mixtures(study(10, seq=False)) == []
    assert mc.seq_mixtures(study(10, seq_sample=None)) == mc.mixtures(study(10))
    cfg = study(10, seq_sample=7, include=[["p01", "p02", "p03"]])
    chosen = mc.seq_mixtures(cfg)
    assert len(chosen) == 8 and "p01+p02+p03" in chosen
    assert chosen == mc.seq_mixtures(copy.deepcopy(cfg))
    cfg["random_seed"] = 5
    assert mc.seq_mixtures(cfg) != chosen
    # Growing the study keeps the sample's size and drops old mixtures only for new ones.
    small = study(10, seq_sample=7)
    grown = study(10, seq_sample=7)
    grown["sources"]["sotu"]["partitions"]["p99"] = 1
    old, new = mc.seq_mixtures(small), mc.seq_mixtures(grown)
    assert len(new) == 7
    assert {m for m in new if "p99" not in m} <= set(old)


def test_token_budgets_are_not_checked_against_an_imported_seeds_unknown_context():
    cfg = mc.load(str(REPO / "configs/study_5.4_size_transfer.yaml"))
    cfg["seed"]["pretrained"] = "EleutherAI/pythia-14m"
    cfg["transfer"].update(pretrained="EleutherAI/pythia-70m")
    cfg["transfer"]["seed_phase"]["tokens"] = 100  # not trained here: an imported large seed
    mc.validate(cfg)
    cfg["seed"]["pretrained"] = None
    mc.validate(cfg)  # the small seed's budgets hold; the large seed is still imported
    cfg["transfer"].update(pretrained=None)
    with pytest.raises(mc.ConfigError, match="transfer.seed_phase.tokens is 100"):
        mc.validate(cfg)


def test_config_examples_in_the_docs_validate():
    """Every ```yaml block of the README and docs/ that is config, merged into config.yaml."""
    import re

    import yaml

    def merge(into, extra):
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    base = yaml.safe_load((REPO / "config.yaml").read_text())
    checked = 0
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "configs" / "README.md"]:
        for block in re.findall(r"```ya?ml\n(.*?)```", doc.read_text(), re.S):
            example = yaml.safe_load(block)
            if not isinstance(example, dict) or not set(example) <= set(base):
                continue
            config = copy.deepcopy(base)
            merge(config, example)
            try:
                mc.validate(config)
            except mc.ConfigError as exc:
                pytest.fail(f"the config example in {doc.relative_to(REPO)} does not validate: {exc}")
            checked += 1
    assert checked >= 1  # docs/incremental.md's new source


def test_a_key_given_twice_is_found_beside_yaml_merge_keys(tmp_path):
    base = "defaults: &d {lr: 1, min_lr: 0}\nphase:\n  <<: *d\n  lr: 2\n"  # overriding a merged key is fine
    (tmp_path / "ok.yaml").write_text(base)
    mc.check_unique_keys(str(tmp_path / "ok.yaml"))
    (tmp_path / "twice.yaml").write_text(base + "  warmup_steps: 3\n  warmup_steps: 4\n")
    with pytest.raises(mc.ConfigError, match=r"twice.yaml line 6: key 'warmup_steps' is given twice"):
        mc.check_unique_keys(str(tmp_path / "twice.yaml"))


def test_a_warm_up_is_checked_against_the_shortest_run_of_its_phase():
    cfg = mc.load(str(REPO / "configs/study_5.4_size_transfer.yaml"))
    unit_steps = ((cfg["train"]["unit_tokens"] - 1) // cfg["model"]["context_length"]) // cfg["train"]["continued"]["batch_size"]
    cfg["train"]["continued"]["warmup_steps"] = unit_steps  # a unit model would spend all its steps warming up
    with pytest.raises(mc.ConfigError, match=r"train.continued.warmup_steps .* is not shorter than the phase"):
        mc.validate(cfg)
    cfg["train"]["continued"]["warmup_steps"] = unit_steps - 1
    # the large seq models train on k units or more: a warm-up longer than one unit is fine there
    cfg["transfer"]["continued"]["warmup_steps"] = unit_steps + 10
    mc.validate(cfg)


def test_micro_batch_must_divide_every_batch():
    cfg = mc.load(str(REPO / "configs/study_5.4_size_transfer.yaml"))
    batches = {cfg["train"]["seed_phase"]["batch_size"], cfg["train"]["continued"]["batch_size"],
               cfg["transfer"]["seed_phase"]["batch_size"], cfg["transfer"]["continued"]["batch_size"]}
    cfg["train"]["micro_batch"] = min(batches)  # 8: divides 16 and 8
    mc.validate(cfg)
    cfg["transfer"]["continued"]["batch_size"] = min(batches) * 3 + 1
    with pytest.raises(mc.ConfigError, match=r"transfer.continued.batch_size \(\d+\) is not a multiple of train.micro_batch"):
        mc.validate(cfg)
    cfg["train"]["micro_batch"] = 0
    with pytest.raises(mc.ConfigError, match=r"train.micro_batch"):
        mc.validate(cfg)


def test_local_data_files_expand_patterns_and_name_the_entry_that_gives_nothing(tmp_path, monkeypatch):
    from mergemix.config import local_data_files

    monkeypatch.chdir(tmp_path)
    for name in ("b/2.jsonl", "a/1.jsonl", "a/deep/3.jsonl", "a/.hidden.jsonl", "c.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    got = local_data_files(["c.jsonl", "**/*.jsonl", "hf://datasets/x/y.jsonl"], "k")
    assert got == ["c.jsonl", "a/1.jsonl", "a/deep/3.jsonl", "b/2.jsonl", "c.jsonl"]
    for entries, message in ((["nope/*.jsonl"], "k: pattern 'nope/*.jsonl' matches no file"),
                             (["a"], "k: 'a' is a folder; list its files or a pattern ('a/*.jsonl')"),
                             (["c.jsonl", "gone.jsonl"], "k: data file 'gone.jsonl' does not exist under")):
        with pytest.raises(mc.ConfigError) as raised:
            local_data_files(entries, "k")
        assert str(raised.value).startswith(message), raised.value
