"""`gradflow probe-backward`: one forward+backward, every trainable parameter's gradient classified."""

from __future__ import annotations

import typer

from gradflow.cli import _options as o
from gradflow.cli._errors import fail


def probe_backward(
    model: o.ModelArg,
    lora_r: o.LoraR = None, lora_alpha: o.LoraAlpha = None, lora_targets: o.LoraTargets = None,
    adapter: o.Adapter = None, adapter_trainable: o.AdapterTrainable = False, quant: o.Quant = "none",
    gc: o.GC = None, dtype: o.DType = None, device: o.Device = "auto", trainable: o.Trainable = None,
    trust_remote_code: o.TrustRemoteCode = False,
    data: o.Data = None, batch_size: o.BatchSize = 2, seq_len: o.SeqLen = 32, seed: o.Seed = 0,
    format: str = typer.Option("text", "--format", help="text | json | sarif"),
    fail_on: o.FailOn = "error",
):
    """Run one forward and backward and show where gradients stop, and why."""
    from gradflow.cli._common import check_fail_on, check_format, exit_for, prepare, user_code
    from gradflow.cli._output import Output

    out = Output(format)
    try:
        check_format(format, ("text", "json", "sarif"))
        check_fail_on(fail_on)
        opts = o.setup_options(lora_r, lora_alpha, lora_targets, adapter, adapter_trainable, quant, gc, dtype,
                               device, trainable, trust_remote_code, seed)
        setup, batch = prepare(model, opts, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed, out=out)
        import gradflow

        with out.status("probing forward and backward"), user_code(setup):
            report = gradflow.probe(setup.model, batch, loss_fn=setup.loss_fn, optimizer=setup.optimizer,
                                    trainable=setup.trainable)
    except Exception as exc:
        fail(exc)
    if format == "json":
        out.data(report.to_dict())
    elif format == "sarif":
        from gradflow.render.sarif import to_sarif

        out.data(to_sarif(report))
    else:
        from gradflow.render.text import probe_text

        out.show(probe_text(report))
    raise typer.Exit(exit_for(report, fail_on))
