"""`gradflow train` packs by default: planned, probed on a packed batch, and resumable bit-exact after SIGKILL.

The reference run (tests.helpers.train.reference_run, shared with the resume tests) is a default, packed run.
"""

from __future__ import annotations

import json
import os

import pytest
from torch.testing import assert_close

from tests.helpers.cli import gradflow
from tests.helpers.train import DEMO, assert_bit_exact, reference_run, start, train_args, wait_for_checkpoint


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


@pytest.mark.slow
def test_a_default_run_is_packed_planned_and_probed_packed(reference):
    output, _ = reference
    report = json.load(open(os.path.join(output, "report.json")))
    train = report["train"]
    assert train["packing"] is True and train["attention"]["attn"] == "sdpa" and train["ce"]["loss"] == "standard"
    plan = report["plan"]
    assert plan["gc"] == "off" and plan["gc_from"] == "--gc"  # tests.helpers.train.JOB passes --gc off
    assert plan["tokens_per_batch"] == 4 * 64 and plan["expected_peak"] > 0
    assert 0 < report["data"]["packed_batches"] < report["data"]["used"]
    assert train["tokens"] > 0  # real tokens: a packed row has no padding
    from gradflow.training.checkpoint import MARKER

    marker = json.load(open(os.path.join(output, "checkpoints", "checkpoint-16", MARKER)))
    assert marker["fingerprint"]["packing"] is True and marker["fingerprint"]["tokens_per_batch_planned"] == 256


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_exact_with_packing(reference, tmp_path):
    output = tmp_path / "run"
    proc = start(*train_args(output))
    wait_for_checkpoint(proc, output, count=2)  # the last two are kept: 3 exist only for an instant
    proc.kill()  # SIGKILL: no handler runs, no cleanup
    proc.communicate()
    res = gradflow(*train_args(output, "--resume"))
    assert res.code == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "plan: " in res.stderr
    assert_bit_exact(output, reference[1])


@pytest.mark.slow
def test_no_packing_pads_and_chunked_loss_matches_standard(tmp_path):
    import gradflow as gf

    losses = {}
    for name, extra in (("padded", {"packing": False}), ("standard", {"ce": "standard"}),
                        ("chunked", {"ce": "chunked"})):
        report = gf.train("tiny-llama", DEMO, str(tmp_path / name), max_steps=2, seq_len=64, logging_steps=1,
                          progress=False, **extra)
        train = report.extra["train"]
        assert train["status"] == "completed", train
        losses[name] = [x["loss"] for x in train["losses"]]
        assert train["packing"] is (name != "padded")
        assert ("packed_batches" in report.extra["data"]) is (name != "padded")
    from gradflow.training.trainer import resolve_ce

    if resolve_ce("chunked", "cpu")[0] == "chunked":  # the chunked loss is the same number, packed or not
        assert_close(losses["chunked"], losses["standard"], atol=1e-4, rtol=1e-4)


def test_the_packed_step_has_the_padded_steps_loss_and_gradients():
    """What Trainer gets from the two collators: one packed row, or padded rows; the same loss and gradients."""
    import torch

    from gradflow.setup.load import load_setup
    from gradflow.setup.build import SetupOptions
    from gradflow.training.dataset import Collator, GroupCollator, prepare_data
    from gradflow.training.options import TrainOptions
    from gradflow.training.trainer import prepare_model

    setup = load_setup("tiny-llama", SetupOptions(gc="off"))
    prepare_model(setup.model, "auto", "cpu")
    rows = prepare_data(DEMO, setup.tokenizer, TrainOptions(seq_len=48)).rows[:3]
    model = setup.model
    model.train()
    results = []
    for batch in (GroupCollator()([rows]), Collator(setup.tokenizer.pad_token_id or 0)(rows)):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert "attention_mask" not in GroupCollator()([rows]) and GroupCollator()([rows])["input_ids"].shape[0] == 1
    assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in results[0][1].values())
    assert torch.isfinite(results[0][0])
