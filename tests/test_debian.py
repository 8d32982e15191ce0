"""Tests for mergemix.debian: the Debian-package recipes.

Parsers run on small hand-written inputs in the real file formats (Packages,
Translation-en, dictd .index/.dict.dz, strfile sources) with exact answers. One test
per recipe really downloads the packages with apt-get (cached in the repo's
``.cache/`` or $MERGEMIX_CACHE) and checks the built corpus; it is skipped where
apt-get or dpkg-deb is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergemix import debian
from mergemix.corpus import CorpusError, build_demo, write_partitions

REPO = Path(__file__).resolve().parents[1]
HAS_APT = shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None
needs_apt = pytest.mark.skipif(not HAS_APT, reason="apt-get and dpkg-deb are needed (Debian or Ubuntu only)")


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep datasets' arrow cache out of the user's home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="session")
def cache() -> Path:
    return Path(os.environ.get("MERGEMIX_CACHE", REPO / ".cache" / "mergemix"))


# --------------------------------------------------------------------------
# Package descriptions
# --------------------------------------------------------------------------

TRANSLATION = """\
Package: gnuplot
Description-md5: 1111
Description-en: Command-line driven interactive plotting program
 Gnuplot is a portable command-line driven interactive data and function
 plotting utility.
 .
 This is a dependency package.
  verbatim line

Package: nethack
Description-md5: 2222
Description-en: dungeon crawl game
 NetHack is a single player dungeon exploration game.

Package: old-name
Description-md5: 9999
Description-en: stale translation of a description no package uses
 Nobody reads this.
"""

PACKAGES_MAIN = """\
Package: gnuplot
Version: 5.4.4+dfsg1-2
Section: math
Description: Command-line driven interactive plotting program
Description-md5: 1111

Package: nethack
Version: 3.6.6-3
Section: games
Description: dungeon crawl game
Description-md5: 2222

Package: shortonly
Version: 1.0
Section: utils
Description: a package with a synopsis and nothing else
Description-md5: 3333
"""

PACKAGES_SECURITY = """\
Package: nethack
Version: 3.6.6-3+deb12u1
Section: games
Description: dungeon crawl game
Description-md5: 2222
"""

PACKAGES_CONTRIB = """\
Package: inline-long
Version: 2.0
Section: contrib/net
Description: a tool whose Packages entry carries the long text
 It fetches things
 .
 from the net.
"""


def test_parse_deb822_fields_and_continuations() -> None:
    stanzas = list(debian.parse_deb822(PACKAGES_CONTRIB + "\n\nPackage: b\nSection: x\n"))
    assert stanzas == [
        {
            "Package": "inline-long",
            "Version": "2.0",
            "Section": "contrib/net",
            "Description": "a tool whose Packages entry carries the long text\n It fetches things\n .\n from the net.",
        },
        {"Package": "b", "Section": "x"},
    ]


def test_description_text_follows_policy() -> None:
    value = next(debian.parse_deb822(TRANSLATION))["Description-en"]
    assert debian.description_text(value) == (
        "Command-line driven interactive plotting program\n\n"
        "Gnuplot is a portable command-line driven interactive data and function\n"
        "plotting utility.\n\nThis is a dependency package.\n verbatim line"
    )
    assert debian.description_text("synopsis only") == "synopsis only"


def test_description_rows_join_on_package_and_md5() -> None:
    rows = debian.description_rows(
        [TRANSLATION], [("main", PACKAGES_MAIN), ("main", PACKAGES_SECURITY), ("contrib", PACKAGES_CONTRIB)]
    )
    assert [(r["package"], r["section"], r["component"], r["version"]) for r in rows] == [
        ("nethack", "games", "main", "3.6.6-3"),  # once, from the first list
        ("gnuplot", "math", "main", "5.4.4+dfsg1-2"),
        ("inline-long", "net", "contrib", "2.0"),  # long text read from Packages itself
    ]  # shortonly has no long description; old-name has no package
    assert rows[0]["text"] == "dungeon crawl game\n\nNetHack is a single player dungeon exploration game."
    assert rows[2]["text"] == "a tool whose Packages entry carries the long text\n\nIt fetches things\n\nfrom the net."


# --------------------------------------------------------------------------
# GCIDE (dictd format)
# --------------------------------------------------------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# Entries as gcide.dict.dz holds them (the real layout: headword line, indented body,
# source notes, a blank line between entries).
ENTRIES = [
    ("00-database-short", "00-database-short\n   A tiny dictionary\n\n"),
    (
        "Albacore",
        'Albacore \\Al"ba*core\\, n. (Zool.)\n   A large fish; a tuna. See {Albicore}.\n   [1913 Webster]\n\n',
    ),
    ("Ai", 'Ai \\A"i\\, n. (Zool.)\n   The three-toed sloth.\n   [1913 Webster] Aiblins\n\n'),
    (
        "Acid",
        'Acid \\Ac"id\\, n.\n   1. (Chem.) A sour substance.\n      [1913 Webster]\n\n'
        "   2. (Fig.) Sharpness.\n      [1913 Webster]\n\n",
    ),
    (
        "Bank",
        "Bank \\Bank\\, n.\n   1. A mound of earth.\n\n   2. (Naut.) A bench for rowers.\n"
        "      [1913 Webster]\n\n   {Bank swallow} (Zool.), the sand martin.\n\n",
    ),
    ("Bile", "Bile \\Bile\\, n. (Physiol. Chem.)\n   A fluid secreted by the liver.\n" "   [Webster 1913 Suppl.]\n\n"),
]


def b64(n: int) -> str:
    out = ""
    while True:
        out = B64[n % 64] + out
        n //= 64
        if n == 0:
            return out


def dictd(entries: list[tuple[str, str]] = ENTRIES) -> tuple[bytes, str]:
    """(gzip-compressed .dict, .index text) of hand-written entries, the index sorted
    by headword as dictd writes it."""
    data, lines, offset = b"", [], 0
    for word, text in entries:
        raw = text.encode()
        lines.append(f"{word}\t{b64(offset)}\t{b64(len(raw))}")
        data += raw
        offset += len(raw)
    return gzip.compress(data), "\n".join(sorted(lines)) + "\n"


def test_dictd_numbers_decode_exactly() -> None:
    index = "zeta\tBA\tc\nalpha\tA\tB\nalias\tBA\tc\n00-database-url\tA\tA\n"
    # "BA" = 1*64 + 0, "c" = 28; two headwords share one entry; 00-database-* is metadata.
    assert debian.parse_dict_index(index) == [(0, 1, ["alpha"]), (64, 28, ["zeta", "alias"])]
    assert b64(64) == "BA" and b64(28) == "c"


def test_entry_subject_reads_the_first_sense() -> None:
    text = dict(ENTRIES)
    assert debian.entry_subject(text["Albacore"]) == "Zool"  # label after the part of speech
    assert debian.entry_subject(text["Acid"]) == "Chem"  # label of sense 1
    assert debian.entry_subject(text["Bank"]) == "general"  # Naut. is sense 2, Zool. a phrase
    assert debian.entry_subject(text["Bile"]) == "Physiol_Chem"
    assert debian.entry_subject("Tart \\Tart\\, a.\n   (Fig.) Sharp.\n") == "general"  # usage, not subject


def test_clean_entry_drops_typesetting() -> None:
    assert debian.clean_entry(dict(ENTRIES)["Albacore"]) == (
        'Albacore \\Al"ba*core\\, n. (Zool.)\nA large fish; a tuna. See Albicore.'
    )
    assert debian.clean_entry(dict(ENTRIES)["Ai"]) == 'Ai \\A"i\\, n. (Zool.)\nThe three-toed sloth.\nAiblins'
    assert (
        debian.clean_entry(dict(ENTRIES)["Acid"])
        == 'Acid \\Ac"id\\, n.\n1. (Chem.) A sour substance.\n\n2. (Fig.) Sharpness.'
    )


def test_group_packs_consecutive_items_of_a_key() -> None:
    items = [("a", "one two"), ("b", "x"), ("a", "three"), ("a", "four five six"), ("b", "y z w"), ("a", "seven")]
    # a closes at 3 words (items 0, 2), then again at 3 (item 3); b closes at 4 words.
    assert debian.group(items, words=3) == [("a", [0, 2]), ("b", [1, 4]), ("a", [3]), ("a", [5])]


def test_gcide_documents_from_real_format() -> None:
    dict_dz, index = dictd()
    rows = debian.gcide_documents(dict_dz, index, "test.deb")
    by_subject = {r["subject"]: r for r in rows}
    assert sorted(by_subject) == ["Chem", "Physiol_Chem", "Zool", "general"]
    zool = by_subject["Zool"]  # dictionary order (by offset), both Zool entries in one document
    assert (zool["first_headword"], zool["last_headword"], zool["n_entries"]) == ("Albacore", "Ai", 2)
    assert zool["text"] == (
        'Albacore \\Al"ba*core\\, n. (Zool.)\nA large fish; a tuna. See Albicore.\n\n'
        'Ai \\A"i\\, n. (Zool.)\nThe three-toed sloth.\nAiblins'
    )
    assert "database" not in " ".join(r["text"] for r in rows)


def test_gcide_bad_input_is_one_clear_error() -> None:
    _, index = dictd()
    with pytest.raises(CorpusError, match=r"gcide\.dict\.dz in x\.deb is not a valid dictzip \(gzip\) file") as err:
        debian.gcide_documents(b"this is not gzip", index, "x.deb")
    assert "\n" not in str(err.value)
    with pytest.raises(CorpusError, match="ends at byte .* past the 0-byte dictionary"):
        debian.gcide_documents(gzip.compress(b""), index, "x.deb")
    with pytest.raises(CorpusError, match="holds no dictionary entries"):
        debian.gcide_documents(gzip.compress(b""), "", "x.deb")
    with pytest.raises(CorpusError, match="index line 1 has 2 tab-separated fields"):
        debian.gcide_documents(gzip.compress(b"abc"), "word\tA\n", "x.deb")


# --------------------------------------------------------------------------
# Fortunes (strfile sources)
# --------------------------------------------------------------------------


def test_parse_fortunes() -> None:
    text = "A day for firm decisions!!!!!  Or is it?\n%\nTwo lines,\n\tindented attribution.\n%\n%\n\nLast one  \n"
    assert debian.parse_fortunes(text) == [
        "A day for firm decisions!!!!!  Or is it?",
        "Two lines,\n\tindented attribution.",
        "Last one",
    ]
    assert debian.parse_fortunes("%\n") == []


# --------------------------------------------------------------------------
# The recipes for real (apt-get download + dpkg-deb -x)
# --------------------------------------------------------------------------


def test_missing_apt_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out, manifest = tmp_path / "g.parquet", tmp_path / "g.manifest.json"
    with pytest.raises(CorpusError, match="demo recipe 'gcide' is built from Debian packages and needs apt-get"):
        build_demo("gcide", tmp_path / "cache", out, manifest)
    assert not out.exists() and not manifest.exists()


def test_an_apt_get_that_hangs_ends_in_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror that never answers: apt-get is stopped after APT_TIMEOUT_S (here an
    apt-get that waits on its input, as one asking a question would, stands in for it)."""
    from mergemix import debian

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\nread answer\nsleep 60\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(debian, "APT_TIMEOUT_S", 2)
    with pytest.raises(CorpusError, match="apt-get update did not finish in 2 s"):
        debian._Apt(tmp_path / "cache").run(["update"], "apt-get update")


def built(recipe: str, cache: Path, tmp_path: Path) -> tuple[pa.Table, dict]:
    out, manifest = tmp_path / f"{recipe}.parquet", tmp_path / f"{recipe}.manifest.json"
    build_demo(recipe, cache, out, manifest)
    return pq.read_table(out), json.loads(manifest.read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_packages(manifest: dict, cache: Path, tmp_path: Path) -> Path:
    """Versions and hashes of the manifest's .debs match the cached files; every listed
    file's sha256 matches the file in a fresh extraction. Returns the extraction root."""
    root = tmp_path / "unpacked"
    for pkg in manifest["packages"]:
        deb = cache / "debian" / "debs" / pkg["deb"]
        assert pkg["deb_sha256"] == sha256(deb)
        fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True)
        assert fields.stdout.strip() == pkg["version"]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    for member, digest in manifest["files"].items():
        assert sha256(root / member) == digest, member
    return root


@needs_apt
def test_gcide_recipe_for_real(cache: Path, tmp_path: Path) -> None:
    table, manifest = built("gcide", cache, tmp_path)
    assert [p["package"] for p in manifest["packages"]] == ["dict-gcide"]
    check_packages(manifest, cache, tmp_path)
    assert sorted(manifest["files"]) == ["usr/share/dictd/gcide.dict.dz", "usr/share/dictd/gcide.index"]
    assert 5_000 < table.num_rows < 30_000 and manifest["n_documents"] == table.num_rows
    # One aggregation read column by column: pyarrow's threaded group_by orders its rows
    # differently from call to call, so two calls cannot be zipped.
    sums = table.group_by("subject").aggregate([("n_entries", "sum")])
    counts = dict(zip(sums["subject"].to_pylist(), sums["n_entries_sum"].to_pylist(), strict=True))
    assert sum(counts.values()) > 100_000  # GCIDE has ~126k entries
    for subject in ("Zool", "Bot", "Chem", "Med", "Law", "Naut"):
        assert counts[subject] > 300, subject
    assert counts["Zool"] > counts["Bot"] > counts["Chem"]
    assert "[1913 Webster]" not in "".join(table["text"].to_pylist()[:500])


@needs_apt
def test_fortunes_recipe_for_real(cache: Path, tmp_path: Path) -> None:
    table, manifest = built("fortunes", cache, tmp_path)
    assert [p["package"] for p in manifest["packages"]] == ["fortunes", "fortunes-min"]
    assert len(manifest["files"]) >= 30  # one fortune file a category: check_packages hashes each
    check_packages(manifest, cache, tmp_path)
    categories = set(table["category"].to_pylist())
    assert {"fortunes", "literature", "riddles", "computers", "science"} <= categories
    assert "ascii-art" not in categories and len(categories) >= 30
    assert 500 < table.num_rows < 3_000
    assert 5_000 < sum(table["n_fortunes"].to_pylist()) < 30_000
    # A rebuild from the cache writes nothing: the outputs keep their mtimes.
    out = tmp_path / "fortunes.parquet"
    os.utime(out, (1_000_000, 1_000_000))
    build_demo("fortunes", cache, out, tmp_path / "fortunes.manifest.json")
    assert out.stat().st_mtime == 1_000_000


@needs_apt
def test_debian_descriptions_recipe_for_real(cache: Path, tmp_path: Path) -> None:
    table, manifest = built("debian_descriptions", cache, tmp_path)
    lists = cache / "debian" / "lists"
    assert manifest["files"] and all(sha256(lists / name) == d for name, d in manifest["files"].items())
    kinds = {i["created-by"] for i in manifest["indexes"]}
    assert kinds == {"Packages", "Translations"}
    assert 20_000 < table.num_rows < 200_000
    sections = table["section"].to_pylist()
    for section in ("science", "games", "python", "net", "libs"):
        assert sections.count(section) > 300, section
    assert len(set(table["package"].to_pylist())) == table.num_rows

    # An unknown section is one clear error naming the available ones, and writes nothing.
    spec = {
        "source": "debian",
        "load": {"demo": "debian_descriptions"},
        "demo_dir": str(tmp_path),
        "text_column": "text",
        "partition_by": ["section"],
        "partitions": ["science", "no-such-section"],
    }
    with pytest.raises(
        CorpusError,
        match=r"partition 'no-such-section' of source 'debian' is empty: " r"available partitions .* are .*'games'",
    ) as err:
        write_partitions(spec, tmp_path / "parts")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "parts").exists() or not any((tmp_path / "parts").iterdir())


@needs_apt
def test_cli_reports_a_corrupt_deb_in_one_line(tmp_path: Path) -> None:
    debs = tmp_path / "cache" / "debian" / "debs"
    debs.mkdir(parents=True)
    (debs / "dict-gcide_0.1_all.deb").write_bytes(b"not an ar archive")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergemix.corpus",
            "demo",
            "--recipe",
            "gcide",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "g.parquet"),
            "--manifest",
            str(tmp_path / "g.json"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        check=False,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "dict-gcide_0.1_all.deb is not a valid .deb of dict-gcide" in errors[0]
    assert not (tmp_path / "g.parquet").exists()


# --------------------------------------------------------------------------
# configs/reproduction.yaml: the study built on these recipes
# --------------------------------------------------------------------------


def test_reproduction_config_is_a_valid_study() -> None:
    from mergemix import config as mmconfig

    cfg = mmconfig.load(str(REPO / "configs" / "reproduction.yaml"))
    parts = mmconfig.partitions(cfg)
    assert sorted(set(parts.values())) == ["debian", "gcide", "sotu"]
    assert all(mmconfig.units(cfg, p) == 1 for p in parts)
    seq = mmconfig.seq_mixtures(cfg)
    assert len(seq) >= 20
    sources = [{parts[p] for p in mmconfig.mixture_members(m)} for m in seq]
    assert any(len(s) == 1 for s in sources) and any(len(s) == 2 for s in sources)
    assert len(cfg["eval"]["ood"]) >= 4 and cfg["eval"]["ood"]["fortunes"]["load"] == {"demo": "fortunes"}


def test_reproduction_config_plans_alone_in_its_own_folder(tmp_path: Path) -> None:
    """The documented command plans this config only: none of config.yaml's keys leak in."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--cores",
            "1",
            "--directory",
            str(tmp_path / "run"),
            "--configfile",
            "configs/reproduction.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, flags=re.MULTILINE))
    assert int(counts["seq"]) >= 20 and counts["unit"] == "18" and counts["demo_corpus"] == "7"
    assert "work/raw/gcide.parquet" in proc.stdout and "work/raw/fortunes.parquet" in proc.stdout
