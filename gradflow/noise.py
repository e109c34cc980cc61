"""The warnings gradflow's own runs provoke, filtered by name; everything else reaches the user."""

from __future__ import annotations

import warnings

# Warnings that gradflow's own runs provoke, each matched by category and message start, with why it is noise.
# Everything else (the user's code and the libraries it calls) still reaches stderr.
KNOWN_NOISE: tuple[tuple[type[Warning], str], ...] = (
    # torch.utils.checkpoint: the probe runs the reentrant regions it diagnoses; GF101 reports this cut, with its fix
    (UserWarning, r"None of the inputs have requires_grad=True"),
    # PEFT's get_peft_model reads transformers 5's deprecated alias itself: nothing the user can change
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # the 4.x name, called by gradflow's demos and by PEFT's prepare_model_for_kbit_training under --quant
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
    # gradflow's LoRA (--lora-r) on GPT-2's Conv1D layers: PEFT sets fan_in_fan_out itself, as it should
    (UserWarning, r"fan_in_fan_out is set to False but the target module is `Conv1D`"),
    # PEFT 0.21's own expert-parameter pattern when gradflow puts LoRA on a Mixtral (a user's patterns still warn)
    (RuntimeWarning, r"The following (rank|alpha)_pattern keys did not match any targeted module and were ignored: "
                     r"\['\.\*\\\\\.gate_up_proj'\]"),
    # PEFT 0.18's save_pretrained of a model built in memory (patch --save of a factory): there is no config dir
    (UserWarning, r"Could not find a config file in"),
)


def ignore_known_noise() -> None:
    """Filter KNOWN_NOISE (each by category and message start); no catch-all filter, so users keep their warnings."""
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
