"""The repository, the stack under test, and the environment a child process (CLI, torchrun, script) starts with."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# a developer's settings and a parent launcher's state that must not reach a child: terminal, debug, warnings, ranks
_DROPPED = ("GRADFLOW_DEBUG", "PYTHONWARNINGS", "COLUMNS", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE",
            "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# what TrainingArguments / accelerate write into os.environ (ACCELERATE_MIXED_PRECISION, ACCELERATE_USE_FSDP, FSDP_*)
_DROPPED_PREFIXES = ("ACCELERATE_", "FSDP_")


def stack() -> str:
    """'new' on transformers 5.x, 'old' on 4.57."""
    import transformers

    return "new" if int(transformers.__version__.split(".")[0]) >= 5 else "old"


def child_env(**extra: str) -> dict:
    """os.environ for a fresh `gradflow` / torchrun / script process, then `extra` (a value of None drops the key).

    A hub id fails fast offline instead of retrying for a minute; tiny models get one intra-op thread (two fight
    over a busy 2-core CPU); the repository is importable (tests.*, factories given as package.module:function).
    """
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED and not k.startswith(_DROPPED_PREFIXES)}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env
