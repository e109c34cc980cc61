"""The train report as text: data, pre-flight, steps, loss, gradient checks, where the outputs are."""

from __future__ import annotations

from gradflow.finding import finding_line


def train_text(report):
    """train_summary as a rich Text (no markup parsing: names like lora_[AB] print as they are)."""
    from rich.text import Text

    return Text(train_summary(report))


def train_summary(report) -> str:
    """What the training run did: data used, pre-flight before/after, steps, loss, gradient checks, outputs."""
    state, data, pre = report.train, report.data, report.preflight
    lines = [f"data      {data['used']} of {data['samples']} samples used, {len(data['skipped'])} skipped, "
             f"{data['think_samples']} /think, {data['supervised_tokens']} supervised tokens"]
    world = report.distributed
    if world:  # under torchrun / accelerate launch
        partial = len(world.get("findings_on_some_ranks") or [])
        lines.append(f"world     {world['world_size']} ranks ({world['backend']})"
                     + (f", {partial} finding(s) on some ranks only" if partial else ""))
    before = pre["errors_before"]
    if before:
        lines.append(f"pre-flight errors before patch: {len(before)}")
        lines.extend(f"  - {line}" for line in before)
        fixes = report.fixes_applied
        lines.append(f"pre-flight fixes applied: {len(fixes)}")
        lines.extend(f"  - {f.get('title', f) if isinstance(f, dict) else f}" for f in fixes)
    after = pre["errors_after"]
    warned = [f for f in report.findings if f.severity == "warning"]  # what the pre-flight left, short of an error
    said = f", {len(warned)} warning{'s' if len(warned) != 1 else ''}" if warned else ""
    lines.append(f"pre-flight {'refused: ' + str(len(after)) + ' error(s) remain' if after else 'clean: no error'}"
                 + said)
    lines.extend(f"  - {line}" for line in after)
    lines.extend(f"  ~ {finding_line(f)}" for f in warned)
    if state["status"] != "refused":
        grads = state["gradients"]
        lines.append(f"train     {state['status']}: {state['steps']}/{state['max_steps']} steps in "
                     f"{state['seconds']}s, {state['tokens_per_second']} tokens/s")
        if state["loss_first"] is not None:
            lines.append(f"loss      {state['loss_first']:.4f} → {state['loss_last']:.4f}")
        checked = (f"{grads['checks']} checks, last at step {grads['last_check_step']}: {grads['missing']} missing, "
                   f"{grads['nonfinite']} non-finite" if grads["checks"] else "no check ran in this process")
        lines.append(f"gradients {checked}; {grads['params_moved']}/{grads['params_trainable']} trainable params moved")
        for f in state["findings"]:
            lines.append(f"  ! {f['code']} {f['slug']}: {f['message']}")
        if state.get("adapter"):
            lines.append(f"adapter   {state['output']}/{state['adapter']}")
        outside = state.get("adapter_outside")
        if outside:  # trainable tensors save_pretrained leaves out, kept beside the adapter
            names = outside["tensors"]
            what = f"{len(names)} trainable tensor{'s' if len(names) != 1 else ''}"
            lines.append(f"          + {outside['file']}: {what} save_pretrained leaves out "
                         f"({names[0]}{', ...' if len(names) > 1 else ''}): "
                         "gradflow.training.load_adapter restores them, PeftModel.from_pretrained does not")
        if state.get("merged"):
            lines.append(f"merged    {state['output']}/{state['merged']}")
    lines.append(f"report    {state['output']}/report.json")
    return "\n".join(lines)
