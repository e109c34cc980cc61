"""--resume checks what it continues: checkpoint manifests, the run's fingerprint, damaged files, finished runs.

Against one uninterrupted reference run (tests.helpers.train.reference_run, a real `gradflow train` process): the
commands through the CLI's main() in-process (the same one line and exit code, without an interpreter start each),
and `--resume-anyway`'s continued run in a real process; plus each kind of damage on copies of its checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.helpers.cli import gradflow, invoke_main
from tests.helpers.train import DEMO, STEPS, copy_run, reference_run, train_args

pytestmark = pytest.mark.slow  # every test reads the reference run, a real `gradflow train` process


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def _listing(output):
    run_dir = os.path.join(output, "checkpoints")
    return {name: os.stat(os.path.join(run_dir, name)).st_mtime_ns for name in os.listdir(run_dir)}


def test_each_checkpoint_records_its_files_step_and_run(reference):
    from gradflow.training.checkpoint import MARKER, damage, sha256_file

    output, _ = reference
    path = os.path.join(output, "checkpoints", f"checkpoint-{STEPS}")
    marker = json.load(open(os.path.join(path, MARKER)))
    assert marker["step"] == marker["max_steps"] == STEPS
    for name, entry in marker["manifest"].items():
        assert entry == {"bytes": os.path.getsize(os.path.join(path, name)),
                         "sha256": sha256_file(os.path.join(path, name))}
    assert {"optimizer.pt", "scheduler.pt", "adapter_model.safetensors", "rng_state.pth"} <= set(marker["manifest"])
    assert marker["fingerprint"]["seed"] == 0 and marker["fingerprint"]["batch_size"] == 4
    assert len(marker["fingerprint"]["data_sha256"]) == 64
    assert damage(path) is None


def test_a_finished_run_resumed_says_complete_and_trains_nothing(reference):
    output, _ = reference
    before = _listing(output)
    res = invoke_main(*train_args(output, "--resume"))
    assert res.code == 0, res.stderr
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        f"gradflow: the run in {output} is complete ({STEPS}/{STEPS} steps): nothing to resume. Its adapter is in "
        f"{output}/adapter; pass --overwrite to train it again"]
    assert _listing(output) == before  # no new checkpoint, none rewritten
    stored = json.load(open(os.path.join(output, "report.json")))["train"]
    as_json = json.loads(invoke_main(*train_args(output, "--resume", "--format", "json")).stdout)["train"]
    assert "startup" in stored and "startup" not in as_json  # the ended run's start-up is not this call's
    assert as_json["already_complete"] is True


@pytest.mark.parametrize("option", ["seed", "data", "batch-size", "lora-r"])
def test_resume_refuses_a_run_made_with_other_options(reference, tmp_path, option):
    output, _ = reference
    data = None
    if option == "data":
        data = tmp_path / "other.jsonl"
        data.write_text("".join(open(DEMO).readlines()[:-1]))  # one sample fewer
    extra = {"seed": ["--seed", "1"], "batch-size": ["--batch-size", "2"], "lora-r": ["--lora-r", "4"],
             "data": []}[option]
    args = train_args(output, "--resume", *extra) if data is None else train_args(output, "--resume", data=str(data))
    res = invoke_main(*args)
    assert res.code == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    expect = {"seed": "--seed 0 → 1", "batch-size": "--batch-size 4 → 2", "lora-r": "--lora-r 8 → 4",
              "data": "--data content sha256"}[option]
    assert lines[0].startswith(f"gradflow: error: --resume: this command differs from the run in {output}: {expect}")
    assert "--resume-anyway" in lines[0]
    assert lines[0].count("→") == 1  # only the option that differs is named


def test_resume_with_the_defaults_typed_out_continues(reference):
    """`--lora-r 8 --lora-alpha 16 --lora-targets all-linear --dtype fp32` are what the run used without them: the
    finished run is found complete, not refused as changed (issue 21)."""
    output, _ = reference
    res = invoke_main(*train_args(output, "--resume", "--lora-r", "8", "--lora-alpha", "16", "--lora-targets",
                                  "all-linear", "--dtype", "fp32"))
    assert res.code == 0 and "is complete" in res.stderr, res.stderr


def _pipe(path, text: str) -> str:
    """A named pipe that gives `text` to the one reader that opens it, as `--data <(cat FILE)` does."""
    import threading

    os.mkfifo(path)

    def feed():
        with open(path, "w") as fh:
            fh.write(text)

    threading.Thread(target=feed, daemon=True).start()
    return str(path)


def test_data_through_a_pipe_is_read_once_and_resume_checks_its_content(reference, tmp_path):
    """A pipe is read once, so the run's data hash is of the bytes it trained on: the same content through a
    pipe resumes the run (here: complete, nothing to do); other content through a pipe is refused (issue 21)."""
    output, _ = reference
    text = open(DEMO).read()
    same = invoke_main(*train_args(output, "--resume", data=_pipe(tmp_path / "same", text)))
    assert same.code == 0 and "is complete" in same.stderr, same.stderr
    other = invoke_main(*train_args(output, "--resume", data=_pipe(tmp_path / "other", text.split("\n", 1)[1])))
    assert other.code == 2 and len(other.stderr.splitlines()) == 1, other.stderr
    assert "--data content sha256" in other.stderr and "e3b0c442" not in other.stderr  # not the empty input's hash


def test_resume_anyway_continues_with_other_options(reference, tmp_path):
    output = copy_run(reference[0], tmp_path / "run")
    refused = gradflow(*train_args(output, "--resume", "--max-steps", STEPS + 2))
    assert refused.code == 2 and f"--max-steps {STEPS} → {STEPS + 2}" in refused.stderr
    res = gradflow(*train_args(output, "--resume-anyway", "--max-steps", STEPS + 2))
    assert res.code == 0, res.stderr[-3000:]
    assert f"gradflow: --resume-anyway: continuing with --max-steps {STEPS} → {STEPS + 2}" in res.stderr
    report = json.loads(open(os.path.join(output, "report.json")).read())
    assert report["train"]["status"] == "completed" and report["train"]["steps"] == STEPS + 2
    assert report["train"]["resume"]["step"] == STEPS
    assert f"checkpoint-{STEPS + 2}" in os.listdir(os.path.join(output, "checkpoints"))
    # the continued process checks its own first step's gradients, as a fresh run checks step 1
    grads = report["train"]["gradients"]
    assert grads["checks"] >= 1 and grads["last_check_step"] >= STEPS + 1 and grads["missing"] == 0, grads


def test_a_run_stopped_after_its_last_checkpoint_gets_its_outputs_without_training(reference, tmp_path):
    import gradflow
    from tests.helpers.train import assert_bit_exact
    from gradflow.setup.build import SetupOptions

    output = copy_run(reference[0], tmp_path / "run")
    shutil.rmtree(os.path.join(output, "adapter"))
    os.remove(os.path.join(output, "report.json"))
    before = _listing(output)
    report = gradflow.train("tiny-llama", DEMO, output, setup_options=SetupOptions(gc="off"), max_steps=STEPS,
                            seq_len=64, save_steps=1, logging_steps=1, learning_rate=1e-3, resume=True,
                            progress=False)  # the same job as tests.helpers.train.JOB, through the library
    assert report.extra["train"]["status"] == "completed" and report.extra["train"]["steps"] == STEPS
    assert _listing(output) == before  # no step trained, no checkpoint written
    assert_bit_exact(output, reference[1])


def test_resume_with_no_intact_checkpoint_is_one_line(reference, tmp_path):
    output = copy_run(reference[0], tmp_path / "run")
    for name in os.listdir(os.path.join(output, "checkpoints")):
        os.remove(os.path.join(output, "checkpoints", name, "optimizer.pt"))
    res = invoke_main(*train_args(output, "--resume"))
    assert res.code == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"gradflow: error: --resume: no intact checkpoint in {output} (checkpoint-{STEPS}: "
                                 "optimizer.pt is missing; ")
    assert "--overwrite" in res.stderr


# ----- each kind of damage, in-process on copies of the reference's checkpoints --------------------------------
def _garbage(path):
    size = os.path.getsize(path)
    with open(path, "wb") as fh:
        fh.write(bytes((i * 7 + 3) % 256 for i in range(size)))


def _renamed_keys(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k.replace("lora_A", "lora_X"): v for k, v in tensors.items()}, path)


DAMAGE = {
    "truncated": (lambda p: os.truncate(p, os.path.getsize(p) // 2), "adapter_model.safetensors",
                  "adapter_model.safetensors is"),
    "empty": (lambda p: os.truncate(p, 0), "adapter_model.safetensors", "adapter_model.safetensors is 0 bytes"),
    "garbage": (_garbage, "adapter_model.safetensors", "adapter_model.safetensors has changed since it was saved"),
    "renamed-keys": (_renamed_keys, "adapter_model.safetensors", "adapter_model.safetensors"),
    "missing-optimizer": (os.remove, "optimizer.pt", "optimizer.pt is missing"),
    "garbage-marker": (_garbage, "gradflow_checkpoint.json", "its gradflow_checkpoint.json is unreadable"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_gives_way_to_the_previous(reference, tmp_path, kind):
    from gradflow.training.checkpoint import newest_intact

    run_dir = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(reference[0], "checkpoints"), run_dir)
    newest, previous = run_dir / f"checkpoint-{STEPS}", run_dir / f"checkpoint-{STEPS - 1}"
    spoil, name, why = DAMAGE[kind]
    spoil(str(newest / name))
    intact, damaged = newest_intact(str(run_dir))
    assert intact.path == str(previous) and intact.step == STEPS - 1
    assert [p for p, _ in damaged] == [str(newest)]
    assert damaged[0][1].startswith(why), damaged


@pytest.mark.parametrize("kind", ["truncated", "missing-optimizer"])
def test_checkpoints_from_before_manifests_are_still_checked(reference, tmp_path, kind):
    from gradflow.training.checkpoint import MARKER, damage

    path = tmp_path / "checkpoint-3"
    shutil.copytree(os.path.join(reference[0], "checkpoints", f"checkpoint-{STEPS}"), path)
    marker = json.load(open(path / MARKER))
    json.dump({"step": marker["step"], "files": marker["files"]}, open(path / MARKER, "w"))  # the old marker
    assert damage(str(path)) is None
    spoil, name, _ = DAMAGE[kind]
    spoil(str(path / name))
    assert damage(str(path)) == {"truncated": "adapter_model.safetensors is unreadable (SafetensorError)",
                                 "missing-optimizer": "optimizer.pt is missing"}[kind]


def test_a_model_directory_whose_weights_changed_is_refused(tmp_path):
    """Train from a MODEL directory, replace its weights (same shapes, another seed), --resume: refused, one line,
    naming the file (issue 21). Before, the fingerprint held the directory's path only and the run went on."""
    from gradflow.setup.presets import build_preset, build_tokenizer

    base = tmp_path / "base"
    build_preset("tiny-llama", seed=0).save_pretrained(base)
    build_tokenizer().save_pretrained(base)
    output = tmp_path / "run"
    args = ["train", str(base), "--data", DEMO, "--output", str(output), "--max-steps", "1", "--save-steps", "1",
            "--seq-len", "64", "--gc", "off"]
    first = invoke_main(*args)
    assert first.code == 0, first.stderr[-3000:]
    build_preset("tiny-llama", seed=1).save_pretrained(base)
    res = invoke_main(*args, "--resume")
    assert res.code == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "MODEL's files changed (model.safetensors)" in res.stderr


def test_a_pickled_file_in_a_checkpoint_is_refused_in_one_line(reference, tmp_path):
    """A checkpoint whose rng_state.pth is a pickled object, its manifest rewritten to match (so the integrity
    check passes): --resume refuses it in one line, exit 2, where it was an internal error (issue 21)."""
    import pickle

    from gradflow.training.checkpoint import MARKER, manifest

    output = copy_run(reference[0], tmp_path / "run")
    shutil.rmtree(os.path.join(output, "checkpoints", f"checkpoint-{STEPS}"))
    for name in ("adapter", "report.json"):
        path = os.path.join(output, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    checkpoint = os.path.join(output, "checkpoints", f"checkpoint-{STEPS - 1}")
    with open(os.path.join(checkpoint, "rng_state.pth"), "wb") as fh:
        pickle.dump({"state": pickle.PickleError("an object")}, fh)  # an object, not plain tensors
    marker = json.load(open(os.path.join(checkpoint, MARKER)))
    with open(os.path.join(checkpoint, MARKER), "w") as fh:
        json.dump(manifest(checkpoint, marker["step"], marker["max_steps"], marker["fingerprint"]), fh)
    res = invoke_main(*train_args(output, "--resume"))
    assert res.code == 2, res.stderr[-3000:]
    assert res.stderr.splitlines()[-1] == (
        f"gradflow: error: --resume: {checkpoint} holds a file that is not plain tensors (torch refused to unpickle "
        "it); a checkpoint gradflow writes never does. Set that checkpoint aside to resume from the one before, or "
        "pass --overwrite to train again")
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
