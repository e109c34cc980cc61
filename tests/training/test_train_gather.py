"""`gradflow train` under torchrun: every rank's pre-flight and live-watch findings gathered to rank 0, and every
rank deciding alike (refuse before training, stop at the same step).

- merge_findings: one finding per (code, location, message), the ranks that saw it, a rank suffix only when not
  every rank did (one process, no collective).
- gather_findings / the watch's stop agreement with real gloo collectives: two forked processes, no model.
- a real 2-process `gradflow train` whose rank 1 alone probes a sample with a token the model's embedding does not
  have (added to the tokenizer without resize_token_embeddings): rank 0's report holds rank 1's error, and both
  ranks refuse before training (no rank left waiting: the run ends well inside its timeout).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import gradflow
from gradflow.report.ranks import gather_findings, merge_findings
from gradflow.world import agree_min
from gradflow.training.callback import GradFlowCallback
from gradflow.training.findings import finding
from tests.helpers.dist import free_port, torchrun
from tests.helpers.env import child_env


# ----- merging, one process ----------------------------------------------------------------------------------
def test_merge_findings_keeps_one_per_finding_and_names_the_ranks_that_saw_it():
    zero = finding("lora-zero-init", "28 lora_A weights got a zero first gradient", location="layers.0.q",
                   params=["a.weight"])
    nan0 = finding("nonfinite-grad", "step 3: NaN/Inf gradient in 1 trainable parameter(s)", location="layers.1",
                   params=["x.weight"])
    nan2 = finding("nonfinite-grad", "step 3: NaN/Inf gradient in 1 trainable parameter(s)", location="layers.1",
                   params=["y.weight", "x.weight"])
    raised = finding("step-raised", "the forward raised IndexError: index out of range in self")
    merged, partial = merge_findings([[zero, nan0], [zero], [zero, nan2, raised]])
    assert [f.slug for f in merged] == ["lora-zero-init", "nonfinite-grad", "step-raised"]
    assert merged[0].message == zero.message and merged[0].params == ["a.weight"]  # every rank: no suffix
    assert merged[1].message == f"{nan0.message} (on ranks 0, 2 of 3)"
    assert merged[1].params == ["x.weight", "y.weight"]  # the union, in the order the ranks named them
    assert merged[2].message == f"{raised.message} (on rank 2 of 3)" and merged[2].severity == "error"
    assert merged[2].code == "GF150" and merged[2].fix == raised.fix
    assert partial == [
        {"code": "GF130", "slug": "nonfinite-grad", "severity": "error", "location": "layers.1", "ranks": [0, 2]},
        {"code": "GF150", "slug": "step-raised", "severity": "error", "location": None, "ranks": [2]}]
    assert nan0.message.endswith("parameter(s)") and nan0.params == ["x.weight"]  # the inputs are left as they were


def test_merge_findings_keeps_differing_messages_apart_and_an_empty_world_empty():
    a = finding("adapter-not-updated", "step 5: 2 of 8 trainable parameters have not changed", location="l.0")
    b = finding("adapter-not-updated", "step 5: 3 of 8 trainable parameters have not changed", location="l.0")
    merged, partial = merge_findings([[a], [b]])
    assert [f.message for f in merged] == [f"{a.message} (on rank 0 of 2)", f"{b.message} (on rank 1 of 2)"]
    assert [p["ranks"] for p in partial] == [[0], [1]]
    assert merge_findings([[], []]) == ([], [])


def test_gather_and_agree_in_one_process_leave_things_as_they_are():
    f = finding("no-supervised-tokens", "by step 1: a batch had no supervised token")
    merged, partial = gather_findings([f])
    assert merged == [f] and partial == []
    assert agree_min(None) is None and agree_min(4) == 4


# ----- real collectives, two gloo processes without a model --------------------------------------------------
def _fork_two_ranks(target, tmp_path) -> None:
    """Run target(rank, port, out_dir) in two forked processes (they inherit torch and transformers: no second
    import) and require both to exit 0 within 120 s."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0, 0]


def _worker(rank: int, port: int, out: str) -> None:
    """One of two forked ranks: only rank 1's watch finds an error at step 1; both then judge step 1."""
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    watch, control, state = GradFlowCallback(check_every=10, moved_at_step=None), TrainerControl(), TrainerState()
    if rank == 1:  # it alone would stop after step 1
        watch._step = 1
        watch._raise(control, state, finding("nonfinite-grad", "step 1: NaN/Inf gradient in 1 trainable "
                                             "parameter(s), first m.w", location="m", params=["m.w"]))
    local = {"stopped_at": watch.stopped_at, "stop": control.should_training_stop}
    state.global_step = 1  # a step every rank judges (the first): the stop is agreed there
    watch.on_step_end(None, state, control)
    merged, partial = gather_findings(watch.findings)
    result = {"local": local, "stopped_at": watch.stopped_at, "stop": control.should_training_stop,
              "findings": [f.to_dict() for f in merged], "partial": partial,
              "min_none": agree_min(None), "min": agree_min(7 if rank == 0 else 3)}
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


@pytest.mark.slow
def test_two_gloo_ranks_gather_findings_and_stop_together(tmp_path):
    _fork_two_ranks(_worker, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["local"] == {"stopped_at": None, "stop": False} and r1["local"] == {"stopped_at": 1, "stop": True}
    for out in (r0, r1):  # both ranks stop, at rank 1's step, and hold the same gathered findings
        assert out["stop"] is True and out["stopped_at"] == 1
        assert [f["slug"] for f in out["findings"]] == ["nonfinite-grad"]
        assert out["findings"][0]["message"].endswith("first m.w (on rank 1 of 2)")
        assert out["partial"] == [{"code": "GF130", "slug": "nonfinite-grad", "severity": "error", "location": "m",
                                   "ranks": [1]}]
        assert out["min_none"] is None and out["min"] == 3


def _callback_worker(rank: int, port: int, out: str) -> None:
    """One of two forked ranks of a user's Trainer run: GradFlowCallback's pre-flight on this rank's first batch;
    rank 1's batch has no supervised token."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from gradflow.setup.presets import build_preset
    from gradflow.setup.build import apply_lora

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = apply_lora(build_preset("tiny-llama"), 4, 8, "all-linear")
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(rank))
    labels = ids.clone() if rank == 0 else torch.full_like(ids, -100)
    loader = torch.utils.data.DataLoader([{"input_ids": ids, "labels": labels}], batch_size=None)
    args = TrainingArguments(output_dir=os.path.join(out, f"args{rank}"), use_cpu=True, report_to=[])
    watch, control, state = GradFlowCallback(check_every=10), TrainerControl(), TrainerState()
    state.is_world_process_zero = rank == 0
    watch.on_train_begin(args, state, control, model=model, train_dataloader=loader)
    result = {"findings": [f.to_dict() for f in watch.findings], "stop": control.should_training_stop}
    watch.on_train_end(args, state, control)
    dist.destroy_process_group()
    with open(os.path.join(out, f"cb{rank}.json"), "w") as fh:
        json.dump(result, fh)


@pytest.mark.slow
def test_callback_preflight_in_a_users_trainer_gathers_every_ranks_findings(tmp_path):
    _fork_two_ranks(_callback_worker, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"cb{r}.json").read_text()) for r in range(2))
    for out in (r0, r1):  # both ranks hold rank 1's finding, marked, and both stop before training
        found = [f for f in out["findings"] if f["slug"] == "no-supervised-tokens"]
        assert len(found) == 1 and found[0]["message"].endswith("(on rank 1 of 2)"), out["findings"]
        assert out["stop"] is True
    assert r0["findings"] == r1["findings"]


# ----- a real 2-process gradflow train ---------------------------------------------------------------------------
def _model_and_data(root) -> tuple[str, str]:
    """tiny-llama whose embedding matches its tokenizer, then a token added to the tokenizer without
    resize_token_embeddings; 4 samples, only the 4th uses the new token."""
    from gradflow.setup.presets import build_preset, build_tokenizer

    model = build_preset("tiny-llama")
    tok = build_tokenizer(model.config.vocab_size)
    model.resize_token_embeddings(len(tok))
    tok.add_tokens(["<|tool|>"])
    assert tok.convert_tokens_to_ids("<|tool|>") == model.get_input_embeddings().num_embeddings
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    data = root / "data.jsonl"
    rows = [{"prompt": f"q{i}?", "completion": f"answer {i}" + (" <|tool|>" if i == 3 else "")} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), str(data)


@pytest.mark.slow
def test_rank_1_only_preflight_error_is_in_rank_0_report_and_both_refuse(tmp_path):
    model, data = _model_and_data(tmp_path)
    out = tmp_path / "run"
    # --batch-size 2, packed: rank 0 probes samples 1-2, rank 1 samples 3-4 (the 4th has the new token)
    res = subprocess.run(torchrun("-m", "gradflow", "train", model, "--data", data, "--output", out, "--batch-size",
                                  "2", "--max-steps", "2", "--seq-len", "32", "--device", "cpu"),
                         capture_output=True, text=True, timeout=180, env=child_env())
    assert res.returncode == 1, res.stderr[-3000:]  # refused (exit 1 on the ranks), not a hang or a crash
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["status"] == "refused"
    line = "GF150 step-raised: the forward raised IndexError: index out of range in self (on rank 1 of 2)"
    assert report["train"]["refused_because"] == [line] and report["preflight"]["errors_after"] == [line]
    raised = [f for f in report["findings"] if f["slug"] == "step-raised"]
    assert len(raised) == 1 and raised[0]["severity"] == "error"
    # rank 0's own probe (report["after"]) was clean: the error came from rank 1
    assert not [f for f in report["after"]["findings"] if f["severity"] == "error"]
    dist = report["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert {"code": "GF150", "slug": "step-raised", "severity": "error", "location": None, "ranks": [1],
            "phase": "pre-flight"} in dist["findings_on_some_ranks"]
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()  # no rank started training
    import jsonschema

    jsonschema.Draft202012Validator(gradflow.schema()).validate(report)
    assert res.stdout.count("pre-flight refused") == 1 and line in res.stdout  # rank 0 speaks for the run
