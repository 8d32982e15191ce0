"""mergemix.io: staging debris is cleared without touching a neighbour's live staging,
and every stage's command line ends in one `error:` line or a traceback for a bug."""

from __future__ import annotations

import errno

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
