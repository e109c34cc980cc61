"""The warnings and log lines gradflow's own runs provoke, filtered by name; everything else reaches the user."""

from __future__ import annotations

import contextlib
import logging
import re
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


# Log lines, each matched by logger name and message start. transformers 5.25 brought in `kernels`, and importing
# bitsandbytes (PEFT does, for any LoRA) then asks the hub for a CPU 4-bit kernel: offline it logs that it skips a
# trust check, without network that it falls back to bitsandbytes' own CPU code. Neither is the user's to act on.
KNOWN_LOG_NOISE: tuple[tuple[str, str], ...] = (
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/"),
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(str(record.msg))


def ignore_known_noise() -> None:
    """Filter KNOWN_NOISE (each by category and message start) and KNOWN_LOG_NOISE (by logger and message start);
    no catch-all filter, so users keep their warnings. Calling it again adds nothing."""
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message in KNOWN_LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropMessages(message))


@contextlib.contextmanager
def refusing_pickles():
    """torch's weights-only loader warns about a pickle's protocol just before it refuses the file: the caller turns
    that refusal (pickle.UnpicklingError) into one line, so the warning would only be a second, confusing one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield
