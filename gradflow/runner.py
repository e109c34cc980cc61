"""From CLI arguments to a ready setup and batch: the one place the commands share."""

from __future__ import annotations

from gradflow.recipe import RecipeOptions, build
from gradflow.sources import Setup, resolve


def load_setup(model: str, opts: RecipeOptions) -> Setup:
    """Resolve MODEL and build the training setup the options describe."""
    opts.validate()
    setup = resolve(model, trust_remote_code=opts.trust_remote_code)
    setup = build(setup, opts)
    if setup.tokenizer is None and setup.kind in ("dir", "hub"):
        setup.tokenizer = _try_tokenizer(setup.source)
    return setup


def _try_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a model directory without a tokenizer is fine until --data needs one
        return None


def make_batch(setup: Setup, *, data: str | None, batch_size: int, seq_len: int, seed: int):
    """The probe batch: from --data, else the factory's batch, else synthetic token ids."""
    from gradflow.probing import model_device, synthetic_batch

    if data is not None:
        from gradflow.data import probe_batch

        return probe_batch(data, setup.tokenizer, batch_size=batch_size, seq_len=seq_len,
                           device=model_device(setup.model))
    if setup.batch is not None or setup.loss_fn is not None:
        return setup.batch
    return synthetic_batch(setup.model, batch_size=batch_size, seq_len=seq_len, seed=seed)
