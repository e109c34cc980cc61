"""## What it does
Finds parameters that are inference tensors: made under `torch.inference_mode()`, for example a model built or
loaded, adapters added, or embeddings resized inside an evaluation block. It looks at the trainable ones, and,
once anything is trainable, at the frozen ones too (all but embedding tables, whose lookups autograd does not need
to save). Static: no forward is needed.

## Why is this bad?
Autograd cannot use an inference tensor outside inference mode. Depending on where it sits, the fine-tune:
- raises in the forward, `Inference tensors cannot be saved for backward` (a frozen base loaded under
  inference mode, with LoRA added afterwards);
- silently cuts the graph: a bias-free `Linear` (LoRA's `lora_A`/`lora_B`, Llama's projections) whose weight is
  an inference tensor returns an output that does not require grad, and `backward()` raises
  `element 0 of tensors does not require grad and does not have a grad_fn`;
- or fails at `optimizer.step()`: `Inplace update to inference tensor outside InferenceMode is not allowed`.
`p.data = p.data.clone()` does not help: `is_inference()` then says False, but the Parameter still keeps no
version counter and the forward raises `Inference tensors do not track version counter`. gradflow flags that
state too.

## Example
```python
with torch.inference_mode():
    model = AutoModelForCausalLM.from_pretrained(path)   # or get_peft_model(...), resize_token_embeddings(...)
model = get_peft_model(model, config)                     # the forward raises
```
Build, load and wrap the model outside `torch.inference_mode()` (use `torch.no_grad()` for evaluation), or
replace each inference parameter with a fresh one:
```python
fresh = {}
for module in model.modules():
    for name, p in list(module.named_parameters(recurse=False)):
        if p.is_inference():
            new = fresh.setdefault(id(p), torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad))
            setattr(module, name, new)   # tied weights stay tied through `fresh`
```

## Fix safety
Display-only: the parameters must be rebuilt outside inference mode, and an optimizer made before that still
holds the old ones.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short

# lookups save only the indices for backward: a frozen inference embedding table breaks nothing
_LOOKUP_MODULES = ("Embedding",)


def check(snap):
    inference = [p for p in snap.params if p.inference and not p.quantized]
    if not inference or not snap.trainable_params():
        return []
    trainable = [p for p in inference if p.requires_grad]
    lookup = {m.name for m in snap.modules if m.cls in _LOOKUP_MODULES}
    frozen = [p for p in inference if not p.requires_grad and p.module not in lookup]
    if not trainable and not frozen:
        return []
    parts = []
    if trainable:
        parts.append(f"{plural(len(trainable), 'trainable parameter')} ({short([p.name for p in trainable], 2)})")
    if frozen:
        parts.append(f"{plural(len(frozen), 'frozen parameter')} beside trainable ones "
                     f"({short([p.name for p in frozen], 2)})")
    first = (trainable or frozen)[0]
    verb = "is an inference tensor" if len(trainable) + len(frozen) == 1 else "are inference tensors"
    message = (f"{' and '.join(parts)} {verb} (made under torch.inference_mode), first at "
               f"{first.module}: autograd cannot save or update them, so training raises or gets no gradient")
    return [RULE.finding(message, location=first.module, params=[p.name for p in trainable + frozen])]


RULE = Rule(
    code="GF113", slug="inference-tensor-params", severity="error",
    fix_title="Build the model and its adapters outside torch.inference_mode(), or replace each inference "
              "parameter with nn.Parameter(p.clone())",
    check=check, doc=__doc__,
)
