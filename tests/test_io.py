"""mergemix.io: staging debris is cleared without touching a neighbour's live staging,
every stage's command line ends in one `error:` line or a traceback for a bug, and a
job's threads bound every thread pool it starts."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergemix import io


def test_staging_clears_its_own_debris_but_not_a_dotted_neighbours(tmp_path):
    live = io.StagingDir(tmp_path / "a.b")  # a job writing `a.b`, still running
    (live.path / "model.safetensors").write_bytes(b"half written")
    debris = tmp_path / ".a.k3j_9x0q.tmp"  # what a killed writer of `a` left behind
    debris.mkdir()
    with io.StagingDir(tmp_path / "a") as stage:
        (stage.path / "x").write_text("x")
        stage.commit()
    assert not debris.exists()
    assert (tmp_path / "a" / "x").read_text() == "x"
    live.commit()  # the neighbour finishes with its file intact
    assert (tmp_path / "a.b" / "model.safetensors").read_bytes() == b"half written"


def test_run_command_prints_one_line_for_expected_errors(capsys):
    class StageError(ValueError):
        pass

    def stage_error():
        raise StageError("partition 'x' is empty: add documents or drop it")

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "out/.model.safetensors.abcd1234.tmp")

    assert io.run_command(lambda: None, (StageError,)) == 0
    assert io.run_command(stage_error, (StageError,)) == 1
    assert capsys.readouterr().err == "error: partition 'x' is empty: add documents or drop it\n"
    assert io.run_command(full_disk, (StageError,)) == 1
    assert capsys.readouterr().err == (
        "error: no space left on device while writing out/model.safetensors: "
        "free space and rerun (nothing partial was kept)\n")


def test_run_command_lets_a_bug_keep_its_traceback():
    def bug():
        raise KeyError("n_tokens")

    with pytest.raises(KeyError):
        io.run_command(bug, (ValueError,))


def run_python(code: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "POLARS_MAX_THREADS", "RAYON_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_a_jobs_threads_bound_polars_and_the_tokenizers_pool():
    # Snakemake exports a job's threads as OMP_NUM_THREADS; polars and rayon (tokenizers)
    # would otherwise start one thread per core, beside the jobs running next to it.
    code = "import mergemix, os, polars; print(polars.thread_pool_size(), os.environ.get('RAYON_NUM_THREADS'))"
    assert run_python(code, OMP_NUM_THREADS="1") == ["1", "1"]
    # A user's own setting wins; without a job's threads nothing is changed.
    assert run_python(code, OMP_NUM_THREADS="1", POLARS_MAX_THREADS="2", RAYON_NUM_THREADS="3") == ["2", "3"]
    assert run_python(code)[1] == "None"


def test_cores_are_the_jobs_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert io.cores() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert io.cores() == len(os.sched_getaffinity(0))


def test_parquet_rows_bounds_its_row_groups_and_writes_atomically(tmp_path):
    import io as bytes_io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [f"document {i} " * (i + 1) for i in range(25)], "row": list(range(25))})
    one = bytes_io.BytesIO()
    pq.write_table(table, one, compression="zstd")
    for rows, max_bytes, groups in ((100, 1 << 20, [25]), (10, 1 << 20, [10, 10, 5]), (100, 1, [3] * 8 + [1])):
        with io.StreamedFile(tmp_path / "t.parquet") as out, io.ParquetRows(out, table.schema, rows, max_bytes) as w:
            for batch in table.to_batches(max_chunksize=3):
                w.write(batch)
        meta = pq.ParquetFile(tmp_path / "t.parquet").metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == groups
        assert pq.read_table(tmp_path / "t.parquet").equals(table)
        if groups == [25]:  # one group: the bytes of writing the whole table at once
            assert (tmp_path / "t.parquet").read_bytes() == one.getvalue()
    before = (tmp_path / "t.parquet").read_bytes()
    with pytest.raises(RuntimeError, match="killed midway"):
        with io.StreamedFile(tmp_path / "t.parquet") as out, io.ParquetRows(out, table.schema) as w:
            w.write(table.to_batches()[0].slice(0, 4))
            raise RuntimeError("killed midway")
    assert (tmp_path / "t.parquet").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_parquet_rows_failing_at_its_end_leaves_one_error_and_no_file(tmp_path):
    """A batch that does not fit the schema fails in the final flush: the writer is closed
    then and there, not by the garbage collector, which would write a footer into the
    closed file and print a second traceback."""
    import gc

    import pyarrow as pa

    with pytest.raises(pa.ArrowInvalid):
        with io.StreamedFile(tmp_path / "t.parquet") as out, io.ParquetRows(out, pa.schema([("text", pa.string())])) as w:
            w.write(pa.record_batch([pa.array([1, 2])], names=["n"]))
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def _hold_scratch_dir(parent):
    """A process inside io.scratch_dir(parent, ".unpack-"), waiting on its input; its folder comes first on stdout."""
    code = ("import sys; from mergemix import io\n"
            "with io.scratch_dir(sys.argv[1], '.unpack-') as tmp:\n"
            "    print(tmp, flush=True); sys.stdin.read()\n")
    return subprocess.Popen([sys.executable, "-c", code, str(parent)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def test_a_killed_jobs_scratch_folder_goes_and_a_running_jobs_stays(tmp_path):
    """SIGKILL skips a TemporaryDirectory's clean-up; the next scratch folder made beside it does it."""
    killed, live = _hold_scratch_dir(tmp_path), _hold_scratch_dir(tmp_path)
    killed_dir, live_dir = (Path(p.stdout.readline().strip()) for p in (killed, live))
    killed.kill()
    killed.wait()
    assert killed_dir.is_dir() and live_dir.is_dir() and killed_dir != live_dir
    unlocked = tmp_path / ".unpack-before-its-lock"  # killed between making its folder and locking it
    unlocked.mkdir()
    other = tmp_path / ".download-abc"  # another prefix: not this one's to sweep
    other.mkdir()
    a_file = tmp_path / ".unpack-notes.txt"  # not a folder: not a scratch folder either
    a_file.write_text("mine")
    try:
        with io.scratch_dir(tmp_path, ".unpack-") as tmp:
            assert tmp.is_dir() and tmp.name.startswith(".unpack-")
            assert not killed_dir.exists() and not unlocked.exists()
            assert live_dir.is_dir(), "the folder of a job still running was removed"
        assert not tmp.exists()
    finally:
        live.communicate("")
    assert live.returncode == 0 and not live_dir.exists()
    assert other.is_dir() and a_file.read_text() == "mine"
