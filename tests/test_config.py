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
        (lambda c: c["train"].update(zero_stage=4), "'train.zero_stage'"),
        (lambda c: c["mixtures"].update(k=12), "mixtures.k is 12"),
        (lambda c: c["mixtures"].update(include=[["1850s", "nope"]]), "unknown partition 'nope'"),
        (lambda c: c["model"].update(num_heads=3), "divisible by model.num_heads"),
        (lambda c: c["sources"].update(other=copy.deepcopy(c["sources"]["sotu"])), "duplicate partition name"),
        (lambda c: c["sources"]["sotu"]["partitions"].update({"bad/name": 1}), "'bad/name' does not match"),
        (lambda c: c["sources"]["sotu"].update(load={"demo": "sotu", "path": "json"}), "exactly one of"),
    ],
)
def test_bad_config_names_the_key(shipped, mutate, expected):
    broken = copy.deepcopy(shipped)
    mutate(broken)
    with pytest.raises(mc.ConfigError) as err:
        mc.validate(broken)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


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
