"""The conda environments in envs/ declare what their rules' jobs import.

With `--sdm conda` each rule runs in its own environment (envs/*.yaml), which holds
fewer packages than pyproject.toml. The tiny workflow of tests/test_workflow.py runs
with tests/conda_envs/sitecustomize.py on PYTHONPATH, which makes every package of
pyproject.toml that a rule's environment leaves out absent for that rule's
`python -m mergemix.<stage>`; so a stage that starts importing an undeclared package
fails that run. (Conda itself cannot run here: no conda channel is reachable.)
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SITE_HOOK = Path(__file__).resolve().parent / "conda_envs"
# conda (or pip) package name -> the top-level module it provides, where they differ;
# None: provides no Python module.
IMPORT_NAME = {"pyyaml": "yaml", "matplotlib-base": "matplotlib", "pytorch-cpu": "torch", "pytorch-gpu": "torch",
               "pytorch": "torch", "python": None, "pip": None, "cxx-compiler": None}


def import_name(requirement: str) -> str | None:
    name = re.split(r"[=<>!~ \[]", requirement.strip(), maxsplit=1)[0].lower()
    return IMPORT_NAME.get(name, name.replace("-", "_"))


def env_imports(env_file: Path) -> set[str]:
    """The top-level modules an environment file declares, conda and pip parts alike."""
    names = set()
    for dep in yaml.safe_load(env_file.read_text())["dependencies"]:
        for requirement in dep["pip"] if isinstance(dep, dict) else [dep]:
            names.add(import_name(requirement))
    return names - {None}


def package_imports() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {import_name(r) for r in project["dependencies"]} - {None}


def rule_stages() -> dict[str, dict]:
    """rule name -> {"env": its conda environment file or None, "modules": the
    `python -m` modules its command runs}."""
    rules = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        blocks = re.split(r"^(?=(?:rule|checkpoint) \w+:)", smk.read_text(), flags=re.M)
        for block in blocks:
            head = re.match(r"(?:rule|checkpoint) (\w+):", block)
            if not head:
                continue
            env = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.-]+\.yaml)"', block)
            rules[head[1]] = {"env": env[1] if env else None,
                              "modules": set(re.findall(r"python -m (mergemix\.\w+)", block))}
    return rules


def absent_by_module() -> dict[str, list[str]]:
    """`python -m` module -> the packages of pyproject.toml its rules' environments lack."""
    everything = package_imports()
    absent: dict[str, set[str]] = {}
    for rule in rule_stages().values():
        if rule["env"]:
            lacking = everything - env_imports(REPO / rule["env"])
            for module in rule["modules"]:
                absent.setdefault(module, set()).update(lacking)
    return {module: sorted(names) for module, names in absent.items()}


def with_rule_environments(env: dict | None = None) -> dict:
    """`env` (default os.environ) with each job limited to its rule's conda environment."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE_HOOK), env.get("PYTHONPATH")) if p)
    env["MERGEMIX_ABSENT"] = json.dumps(absent_by_module())
    return env


def test_every_rule_that_runs_mergemix_names_an_environment():
    rules = rule_stages()
    assert {"seed", "unit", "seq", "score_merged", "collect", "analyze", "figures"} <= set(rules)
    bare = sorted(name for name, rule in rules.items() if rule["modules"] and not rule["env"])
    assert not bare, f"rules that run mergemix without a conda: directive: {bare}"
    for rule in rules.values():
        if rule["env"]:
            assert (REPO / rule["env"]).is_file(), rule["env"]


def test_environments_declare_nothing_pyproject_lacks():
    """A pip install (scripts/install.sh) has everything a conda environment has."""
    everything = package_imports()
    for env_file in sorted((REPO / "envs").glob("*.yaml")):
        extra = env_imports(env_file) - everything
        assert not extra, f"{env_file.name} declares {sorted(extra)}, which pyproject.toml does not"


def test_analysis_environment_leaves_out_the_training_stack():
    """The analysis rules run without torch: the hook makes it absent, and their stages
    still start; a stage made to lack a package it needs fails as it would in conda."""
    absent = absent_by_module()
    assert {"torch", "deepspeed", "transformers"} <= set(absent["mergemix.analyze"])
    assert "torch" not in absent["mergemix.train"]
    env = with_rule_environments()
    started = subprocess.run([sys.executable, "-m", "mergemix.plots", "--help"], env=env,
                             capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    env["MERGEMIX_ABSENT"] = json.dumps({"mergemix.plots": ["matplotlib"]})
    lacking = subprocess.run([sys.executable, "-m", "mergemix.plots", "--help"], env=env,
                             capture_output=True, text=True)
    assert lacking.returncode != 0 and "No module named 'matplotlib'" in lacking.stderr
