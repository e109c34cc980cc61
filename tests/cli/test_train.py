"""`gradflow train` / `gradflow merge` through the CLI: outputs, privacy of /think text, exit codes.

Training runs go through a real process (slow); refusals before training through main() in-process."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cli import gradflow, invoke_main

PLANTED = "PLANTED-THOUGHT-7f3a91"


def _think_data(path, n=8, planted=PLANTED):
    with open(path, "w") as fh:
        for i in range(n):
            content = (f"<think-task>{planted} task {i}</think-task><think-safety>{planted} safe</think-safety>"
                       f"<think-policy>{planted} policy</think-policy><final>answer {i}</final>")
            fh.write(json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": f"question {i}"},
                                                             {"role": "assistant", "content": content}]}) + "\n")
    return str(path)


@pytest.mark.slow
def test_train_cli_never_writes_the_thinking_text(tmp_path):
    data = _think_data(tmp_path / "d.jsonl")
    with open(data, "a") as fh:  # a malformed /think line: reported by file:line, its text never quoted
        fh.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                 "content": f"<think-task>{PLANTED}</think-task><final>x</final>"}]}) + "\n")
    out = tmp_path / "run"
    res = gradflow("train", "tiny-llama", "--data", data, "--output", str(out), "--max-steps", "4",
                   "--save-steps", "2", "--seq-len", "128", "--lr", "1e-3", "--gc", "off", "--logging-steps", "1",
                   "--so8-layers", "1", "--merge")
    assert res.code == 0, res.stderr
    assert PLANTED not in res.stdout and PLANTED not in res.stderr
    assert "d.jsonl:9" in res.stderr and "answer 0" in res.stderr  # the skipped line, and a <final> preview
    import hashlib

    digest = hashlib.sha256(f"{PLANTED} task 0\n{PLANTED} safe\n{PLANTED} policy".encode()).hexdigest()
    assert digest in res.stderr
    written = [os.path.join(root, f) for root, _, files in os.walk(out) for f in files]
    kinds = {os.path.relpath(p, out).split(os.sep)[0] for p in written}
    assert {"adapter", "checkpoints", "tensorboard", "merged", "report.json", "audit.jsonl",
            "grad_norms.png"} <= kinds
    for path in written:
        with open(path, "rb") as fh:
            blob = fh.read()
        for encoding in ("utf-8", "utf-16-le"):
            assert PLANTED.encode(encoding) not in blob, path
    audit = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert audit[0] == {"id": "s0", "line": 1, "think_sha256": [digest], "tokens": audit[0]["tokens"],
                        "supervised_tokens": audit[0]["supervised_tokens"],
                        "tokens_before_truncation": audit[0]["tokens_before_truncation"], "truncated": False}
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["skipped"][0].startswith(f"{data}:9: ")
    assert "train     completed: 4/4 steps" in res.stdout


@pytest.mark.slow
def test_merge_cli_writes_a_full_model(tmp_path):
    data = _think_data(tmp_path / "d.jsonl", n=4, planted="x")
    run = tmp_path / "run"
    res = gradflow("train", "tiny-phi3", "--data", data, "--output", str(run), "--max-steps", "2",
                   "--seq-len", "96", "--gc", "off", "--so8-layers", "0,1")
    assert res.code == 0, res.stderr
    res = gradflow("merge", str(run / "adapter"), "--output", str(tmp_path / "merged"))
    assert res.code == 0, res.stderr
    assert "2 SO(8) rotation(s) folded" in res.stdout
    assert os.path.isfile(tmp_path / "merged" / "config.json")


def _one_line_exit_2(res):
    assert res.code == 2, (res.stdout, res.stderr)
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradflow: error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def _bad(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(lines))
    return str(path)


@pytest.mark.parametrize("case", ["empty", "all-malformed", "output-is-file", "resume-without-checkpoint",
                                  "unknown-role", "seq-len-below-prompt"])
def test_bad_inputs_exit_2_with_one_line(tmp_path, case):
    good = _think_data(tmp_path / "good.jsonl", n=2, planted="p")
    out = str(tmp_path / "run")
    args = {"data": good, "output": out, "extra": []}
    expect = None
    if case == "empty":
        args["data"], expect = _bad(tmp_path, "e.jsonl", ["\n", "  \n"]), "is empty"
    elif case == "all-malformed":
        args["data"], expect = _bad(tmp_path, "m.jsonl", ["{oops\n", "[1, 2]\n", '{"foo": 1}\n']), "every line"
    elif case == "output-is-file":
        args["output"] = _bad(tmp_path, "file.txt", ["x"])
        expect = "is a file"
    elif case == "resume-without-checkpoint":
        args["extra"], expect = ["--resume"], "no complete checkpoint"
    elif case == "unknown-role":
        args["data"] = _bad(tmp_path, "r.jsonl", [json.dumps({"messages": [
            {"role": "wizard CANARY", "content": "hi"}, {"role": "assistant", "content": "ok"}]}) + "\n"])
        expect = "messages[0] has an unknown role (use system, user, assistant, tool)"  # the value is never quoted
    elif case == "seq-len-below-prompt":
        args["data"] = _bad(tmp_path, "s.jsonl", [json.dumps({"prompt": "a very long prompt " * 5,
                                                               "completion": "x"}) + "\n"])
        args["extra"], expect = ["--seq-len", "16"], "--seq-len 16 is shorter than the prompt"
    res = invoke_main("train", "tiny-phi3", "--data", args["data"], "--output", args["output"], "--max-steps", "1",
                      *args["extra"])
    line = _one_line_exit_2(res)
    assert expect in line and "CANARY" not in line, line


def test_strict_fails_on_the_first_bad_line(tmp_path):
    data = _think_data(tmp_path / "d.jsonl", n=2, planted="p")
    with open(data, "a") as fh:
        fh.write('{"messages": [{"role": "wizard", "content": "x"}]}\n')
    res = invoke_main("train", "tiny-phi3", "--data", data, "--output", str(tmp_path / "run"), "--strict")
    line = _one_line_exit_2(res)
    assert "d.jsonl:3" in line and "--strict" in line


def test_preflight_refuses_an_unfixable_setup_with_exit_1(tmp_path):
    factory = tmp_path / "frozen.py"
    factory.write_text(
        "def build():\n"
        "    from gradflow.setup.presets import build_preset, build_tokenizer\n"
        "    model = build_preset('tiny-llama')\n"
        "    model.requires_grad_(False)\n"
        "    return {'model': model, 'tokenizer': build_tokenizer()}\n")
    data = _think_data(tmp_path / "d.jsonl", n=2, planted="p")
    res = invoke_main("train", f"{factory}:build", "--data", data, "--output", str(tmp_path / "run"),
                      "--max-steps", "2", "--format", "json")
    assert res.code == 1, res.stderr
    report = json.loads(res.stdout)
    assert report["train"]["status"] == "refused"
    assert "no-trainable-parameters" in report["train"]["refused_because"][0]
    assert "refused to start" in res.stderr and "no-trainable-parameters" in res.stderr
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_recipe_from_patch_save_is_applied_before_the_preflight(tmp_path):
    from importlib import resources

    pytest.importorskip("gradflow.cli.patch_cmd")
    saved = tmp_path / "patched"
    res = gradflow("patch", "gradflow.demos:seed_bug", "--save", str(saved))
    assert res.code == 0, res.stderr
    demo = str(resources.files("gradflow") / "data" / "think_demo.jsonl")
    out = tmp_path / "run"
    res = gradflow("train", "gradflow.demos:seed_bug", "--data", demo, "--output", str(out), "--recipe", str(saved),
                   "--max-steps", "2", "--seq-len", "64", "--format", "json")
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["preflight"]["recipe"]["changes"]  # the recipe changed the fresh model...
    assert report["preflight"]["errors_before"] == []  # ...so the pre-flight found it healthy already
    assert report["train"]["status"] == "completed"
