"""GradFlowCallback's diagnosis: when a check step finds missing or non-finite gradients, probe the last batch the
model saw to name the cause."""

from __future__ import annotations

from gradflow.api import probe


def probe_cause(model, last_batch) -> list:
    """The probe's error findings on the last batch (`(args, kwargs)` of the model's forward): why the gradient
    stops. A batch passed positionally, or a probe that fails, gives none."""
    try:
        args, kwargs = last_batch
        report = probe(model, dict(kwargs)) if not args else None
        return [f for f in (report.findings if report else []) if f.severity == "error"]
    except Exception:  # noqa: BLE001 - a diagnosis that fails must not hide the finding it explains
        return []

