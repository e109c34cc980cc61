"""Report.from_dict is to_dict's inverse: what resume reads back from report.json prints as it was written."""

from __future__ import annotations

import json

import pytest

import gradflow
from gradflow.report import Report
from gradflow.setup.presets import build_preset


def _reports():
    from peft import LoraConfig, get_peft_model

    model = build_preset("tiny-llama", seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    probed = gradflow.probe(model)
    patched = gradflow.patch(model)
    return {"probe": probed, "patch": patched, "inspect": gradflow.inspect(model)}


@pytest.mark.parametrize("detail", ["compact", "params"])
def test_from_dict_round_trips_probe_patch_and_inspect(detail):
    for name, report in _reports().items():
        data = json.loads(json.dumps(report.to_dict(detail)))
        again = Report.from_dict(data)
        assert again.to_dict(detail) == data, name
        assert [f.slug for f in again.findings] == [f.slug for f in report.findings]
    assert again.patch is None and Report.from_dict(_reports()["patch"].to_dict()).patch.verification["ok"]


def test_sections_are_typed_fields_and_extra_is_a_read_only_view():
    report = _reports()["patch"]
    assert report.patch is not None and report.extra["verification"] == report.patch.verification
    with pytest.raises(TypeError):
        report.extra["verification"] = None  # writes go to the typed fields, never to a copy that is thrown away
    assert "trained_model" not in report.to_dict() and report.trained_model is None
