"""MODEL → a ready setup and its batch: the one loader every command and `gradflow train` use."""

from __future__ import annotations

from typing import Any, Callable

from gradflow.data.jsonl import file_rows, read_jsonl, read_once
from gradflow.data.packing import batch_of
from gradflow.errors import GradflowError
from gradflow.forward import model_device, synthetic_batch, to_device, vocab_size
from gradflow.limits import check_positive
from gradflow.setup.build import build
from gradflow.setup.options import SetupOptions
from gradflow.setup.sources import Kind, Setup, resolve, setup_from_factory_result


def load_batch(model, opts: SetupOptions, *, data: str | None = None, batch_size: int = 2, seq_len: int = 32,
               seed: int = 0, packed: bool = False, adopt: Callable[[Setup], None] | None = None) -> tuple[Setup, Any]:
    """Resolve and build MODEL, then its batch: JSONL samples (`data`) or synthetic ids; `packed`: one packed row.

    Bad numbers and a bad data file fail before the model loads. `adopt(setup)` may adjust the setup before the
    batch is made (gradflow.distributed.adopt sets a factory's DDP wrapper aside).
    """
    check_positive(batch_size, "--batch-size")
    check_positive(seq_len, "--seq-len", 32)
    if data is not None:
        data = read_once(data)  # a pipe is read once: checked and batched from the same bytes
        check_data(data)
    setup = load_setup(model, opts)
    if adopt is not None:
        adopt(setup)
    return setup, make_batch(setup, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed, packed=packed)


def check_data(path: str) -> None:
    """A bad --data file fails before the model loads, not after."""
    _, problems = read_jsonl(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GradflowError(f"malformed sample at {problems[0]}{more}", "Fix or remove that line")


def load_setup(model, opts: SetupOptions) -> Setup:
    """Resolve MODEL and build the training setup the options describe."""
    return build_setup(resolve_setup(model, opts), opts)


def resolve_setup(model, opts: SetupOptions) -> Setup:
    """MODEL as a Setup, nothing built yet: a spec string, a Setup, or an nn.Module / factory-style dict."""
    if isinstance(model, Setup):
        return model
    if isinstance(model, str):
        setup = resolve(model, trust_remote_code=opts.trust_remote_code)
        if setup.kind == Kind.CONFIG:  # a config.json alone holds no weights to load
            raise GradflowError(f"{model} is a config file, and gradflow needs the model's weights to run it",
                                "Pass --dry-run to judge the setup without weights, or the directory holding the "
                                "config and weights")
        return setup
    import torch

    if isinstance(model, (torch.nn.Module, dict)):
        setup = setup_from_factory_result(model, type(model).__name__)
        if setup.kind != Kind.TRAINER:
            setup.kind = Kind.OBJECT  # built by the caller: trained in place
        return setup
    raise GradflowError(f"cannot use a {type(model).__name__} as MODEL", "Pass a MODEL spec string or an nn.Module")


def build_setup(setup: Setup, opts: SetupOptions, *, check_flags: bool = True) -> Setup:
    """Build a resolved setup as the options say (LoRA, adapter, quantization, checkpointing), with its tokenizer."""
    if check_flags:
        check_lora_flags(setup, opts)
    setup = build(setup, opts)
    if setup.tokenizer is None and setup.kind in (Kind.DIR, Kind.HUB):
        setup.tokenizer = _try_tokenizer(setup.source)
    return setup


def check_lora_flags(setup: Setup, opts: SetupOptions) -> None:
    """--lora-targets / --lora-alpha without a LoRA to shape would be silently ignored: say so instead."""
    if not (opts.lora_targets or opts.lora_alpha) or opts.adapter is not None:
        return
    flag = "--lora-targets" if opts.lora_targets else "--lora-alpha"
    if opts.lora_r == 0:
        raise GradflowError(f"{flag} has no effect with --lora-r 0", "Drop it, or pass a rank like --lora-r 8")
    if opts.lora_r is None and setup.kind == Kind.FACTORY:
        raise GradflowError(f"{flag} has no effect: gradflow adds no LoRA to a factory's model unless asked",
                            "Pass --lora-r 8 (or another rank) with it, or add LoRA inside the factory")


def _try_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a model directory without a tokenizer is fine until --data needs one
        return None


def make_batch(setup: Setup, *, data: str | None = None, batch_size: int = 2, seq_len: int = 32, seed: int = 0,
          packed: bool = False):
    """The probe batch: from --data, else the factory's batch, else synthetic token ids; None for a Trainer (its
    own first batch, drawn when gradflow drives its train() to the first step).

    `packed` (--packed): the --batch-size samples (at least 2; each at most --seq-len tokens) in one row, position
    ids restarting per sample and no attention_mask (gradflow.data.packing), as a packed training batch has; from
    --data's first samples, else synthetic token ids of distinct lengths.
    """
    if packed:
        _check_packable(setup, data, batch_size)
    if setup.kind == Kind.TRAINER:
        if data is not None:
            raise GradflowError(f"{setup.source} returns a Trainer, whose dataloader gives the batch; --data would "
                                "be ignored", "Drop --data (the trainer's train_dataset is probed)")
        return None
    device = model_device(setup.model)
    if data is None and (setup.batch is not None or (setup.loss_fn is not None and vocab_size(setup.model) is None)):
        return to_device(setup.batch, device)  # a loss_fn on a model without a vocab makes its own inputs
    check_seq_len(setup.model, seq_len)
    if data is not None:
        rows = file_rows(data, setup.tokenizer, count=batch_size, seq_len=seq_len)
        if packed and len(rows) < 2:
            raise GradflowError(f"--packed needs at least 2 samples and {data} has {len(rows)}",
                                "Add samples to the file, or drop --packed")
        pad = setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else 0
        return batch_of(rows, packed=packed, pad_id=pad, device=device)
    if vocab_size(setup.model) is None and packed:
        raise GradflowError(f"{setup.source} has no vocab_size to make token ids for", "Pass --data FILE with --packed")
    if vocab_size(setup.model) is None:
        raise GradflowError(f"{setup.source} gave a {type(setup.model).__name__} without a batch, and it has no "
                            "vocab_size to make token ids for",
                            "Return {'model': ..., 'batch': ...} from the factory (and 'loss_fn' if the model returns "
                            "no loss)")
    if not packed:
        return synthetic_batch(setup.model, batch_size=batch_size, seq_len=seq_len, seed=seed)
    return batch_of(_synthetic_rows(vocab_size(setup.model), batch_size, seq_len, seed), packed=True, device=device)


def _check_packable(setup: Setup, data: str | None, batch_size: int) -> None:
    if batch_size < 2:
        raise GradflowError(f"--packed needs at least 2 samples to pack, got --batch-size {batch_size}",
                            "Pass --batch-size 2 or more")
    if setup.kind == Kind.TRAINER:
        raise GradflowError(f"{setup.source} returns a Trainer, whose collator decides whether batches are packed",
                            "Drop --packed (give the trainer a packing collator to probe packed batches)")
    if data is None and (setup.batch is not None or setup.loss_fn is not None):
        raise GradflowError(f"--packed builds its batch from token ids, and {setup.source} brings its own batch",
                            "Pass --data FILE with --packed, or return a packed batch (position_ids restarting per "
                            "sample) from the factory")


def _synthetic_rows(vocab: int, count: int, seq_len: int, seed: int) -> list[dict]:
    """Token-id rows of distinct lengths, so that no sample boundary falls at a round position."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        ids = torch.randint(min(3, vocab - 1), vocab, (max(4, seq_len - 3 * i),), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


# learned absolute position tables: a longer sequence indexes past their end (rotary positions have no such limit)
_POSITION_TABLES = ("wpe", "position_embeddings", "embed_positions")


def check_seq_len(model, seq_len: int) -> None:
    """--seq-len must fit a learned position-embedding table, or the forward fails with an IndexError."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            if seq_len > module.num_embeddings:
                raise GradflowError(f"--seq-len {seq_len} is longer than the model's {module.num_embeddings} "
                                    f"learned positions ({name})", f"Pass --seq-len {module.num_embeddings} or less")


