"""The output lock against a hostile or careless neighbour (issue 21): a planted symbolic link is refused and never
written through; deleting the lock file does not free a directory a live run holds. Through the CLI's main(), in
process: the lock is taken before the model loads, so each refusal is quick."""

from __future__ import annotations

import os

import pytest

from gradflow.training.lock import LOCK_NAME, OutputLock
from tests.helpers.cli import invoke_main
from tests.helpers.train import train_args


@pytest.mark.parametrize("extra", [[], ["--resume"], ["--overwrite"]], ids=["new", "resume", "overwrite"])
def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path, extra):
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file\n")
    output = tmp_path / "run"
    output.mkdir()
    (output / LOCK_NAME).symlink_to(victim)
    run = invoke_main(*train_args(output, *extra, data=str(tmp_path / "bad.jsonl")))  # bad data: fails after the lock
    assert run.code == 2 and run.stdout == ""
    assert run.stderr == (f"gradflow: error: {output / LOCK_NAME} is not a lock file gradflow can use (a symbolic "
                          "link); nothing was written through it. Remove it (a run recreates it), or pass another "
                          "--output\n")
    assert victim.read_text() == "another user's file\n" and (output / LOCK_NAME).is_symlink()


@pytest.mark.parametrize("planted", ["directory", "fifo"])
def test_a_lock_path_that_is_not_a_file_is_refused(tmp_path, planted):
    output = tmp_path / "run"
    output.mkdir()
    (output / LOCK_NAME).mkdir() if planted == "directory" else os.mkfifo(output / LOCK_NAME)
    run = invoke_main(*train_args(output))
    assert run.code == 2 and run.stdout == "" and len(run.stderr.splitlines()) == 1, run.stderr
    assert f"{output / LOCK_NAME} is not " in run.stderr and "Remove it (a run recreates it)" in run.stderr


def test_deleting_the_lock_file_does_not_free_a_live_run_s_directory(tmp_path):
    """A live run (its lock held here) keeps --output although its lock file was deleted: --overwrite and a second
    run are refused, and nothing of the live run's is removed."""
    output = tmp_path / "run"
    live = OutputLock(str(output))
    live.acquire()
    try:
        (output / "adapter").mkdir()
        (output / "adapter" / "adapter_model.safetensors").write_bytes(b"live")
        os.unlink(output / LOCK_NAME)
        for extra in (["--overwrite"], []):
            run = invoke_main(*train_args(output, *extra))
            assert run.code == 2 and run.stdout == ""
            assert run.stderr == (f"gradflow: error: --output {output} is in use by another gradflow train run (PID "
                                  "unknown). Wait for it to end, or pass another --output\n")
        assert (output / "adapter" / "adapter_model.safetensors").read_bytes() == b"live"
    finally:
        live.release()
    fresh = OutputLock(str(output))  # released: free again, and the lock file is back with this PID
    fresh.acquire()
    assert (output / LOCK_NAME).read_text().strip() == str(os.getpid())
    fresh.release()


@pytest.mark.parametrize("extra", [["--overwrite"], ["--resume"]], ids=["overwrite", "resume"])
def test_a_run_folder_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, extra):
    """--overwrite would delete through a `checkpoints` link, and --resume read through it: both refused, one
    line, before anything is touched (issue 21)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("someone else's\n")
    output = tmp_path / "run"
    output.mkdir()
    (output / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    run = invoke_main(*train_args(output, *extra))
    assert run.code == 2 and run.stdout == ""
    assert run.stderr == (f"gradflow: error: --output {output / 'checkpoints'} is a symbolic link, and a run writes "
                          "and deletes only inside its own directory. Remove the link, or pass another --output\n")
    assert (elsewhere / "keep.txt").read_text() == "someone else's\n" and (output / "checkpoints").is_symlink()
