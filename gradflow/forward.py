"""The forward helpers every layer uses: where a model lives, a synthetic batch, calling a model on a batch, and its
loss (the RNG state to replay a step is gradflow.model_state's). torch is imported inside the functions, so importing
this module stays cheap."""

from __future__ import annotations

from collections.abc import Mapping


def model_device(model):
    import torch

    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size:
        return int(size)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def synthetic_batch(model, *, batch_size: int = 2, seq_len: int = 32, seed: int = 0) -> dict:
    """Token ids inside the vocab and labels equal to them: a causal-LM batch."""
    import torch

    vocab = vocab_size(model)
    if vocab is None:
        raise ValueError("cannot synthesise a batch: the model has no vocab_size; pass a batch or loss_fn")
    gen = torch.Generator().manual_seed(seed)
    # skip the first ids: presets keep pad/bos/eos there
    ids = torch.randint(min(3, vocab - 1), vocab, (batch_size, seq_len), generator=gen)
    device = model_device(model)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.clone().to(device)}


def batch_or_synthetic(model, batch, loss_fn):
    """`batch`, else the synthetic one (SPEC: batch=None synthesises a batch), for a `loss_fn` too; None only for a
    loss_fn on a model without a vocab, which then makes its own inputs."""
    if batch is None and (loss_fn is None or vocab_size(model) is not None):
        return synthetic_batch(model)
    return batch


def fresh(batch):
    """A new copy of the batch's containers (the tensors shared), as a dataloader hands each step its own: a
    `compute_loss` that pops keys from its inputs must not change the batch the next step gets."""
    if type(batch) is dict:
        return {k: fresh(v) for k, v in batch.items()}
    if isinstance(batch, Mapping):  # a tokenizer's BatchEncoding (a UserDict), an OrderedDict
        import copy

        return copy.copy(batch)
    if isinstance(batch, list):
        return [fresh(v) for v in batch]
    if isinstance(batch, tuple) and not hasattr(batch, "_fields"):
        return tuple(fresh(v) for v in batch)
    return batch


def call_model(model, batch):
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def extract_loss(out):
    """The scalar loss from a model output or a loss_fn's return value."""
    import torch

    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None and isinstance(out, torch.Tensor):
        loss = out
    if loss is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        loss = out[0]
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"no loss in the output ({type(out).__name__}); pass labels in the batch or a loss_fn")
    if loss.numel() != 1:
        raise TypeError(f"the loss has shape {tuple(loss.shape)}, not a scalar; reduce it in your loss_fn")
    # a reshape of a 0-dim loss would add a view node and hide a hand-made leaf (loss.requires_grad_())
    return loss if loss.dim() == 0 else loss.reshape(())


def to_device(batch, device):
    """A batch on `device` (tensors in dicts, lists and tuples; a mapping such as a collator's BatchEncoding
    becomes a dict, as a forward takes it)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
