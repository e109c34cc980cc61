"""Shared fixtures: tiny real models (random init, fixed seeds) built locally, on both stacks."""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest

pytest.register_assert_rewrite("tests.helpers")  # the shared assertions (assert_fires, ...) explain their failures

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spin-waits make them ~100x slower
os.environ.setdefault("OMP_NUM_THREADS", "1")
# a hub id must fail fast on a machine without network, in-process CLI runs too (huggingface_hub reads it on import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# gradflow's caches across runs (tokenised data, compiled kernels) in a directory of this session, not ~/.cache
os.environ.setdefault("GRADFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="gradflow-test-cache-"))
warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")


def pytest_configure(config):
    # pytest resets warning filters per test; the rule tests build reentrant regions without grad inputs on purpose
    config.addinivalue_line("filterwarnings", "ignore:None of the inputs have requires_grad:UserWarning")
    # library chatter the tests trigger on purpose: LoRA on GPT-2's tied embeddings, and peft's
    # prepare_model_for_kbit_training passing no use_reentrant on transformers 5
    config.addinivalue_line("filterwarnings", "ignore:Model has `tie_word_embeddings=True`:UserWarning")
    config.addinivalue_line("filterwarnings", "ignore:torch.utils.checkpoint. the use_reentrant parameter:UserWarning")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _own_process_env():
    # TrainingArguments writes ACCELERATE_MIXED_PRECISION into os.environ (TRL 0.29's SFTConfig: bf16 by default),
    # and every later Accelerator reads it: each test runs as if in its own process, as a user's train.py does
    saved = dict(os.environ)
    for var in ("COLUMNS", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE"):  # in-process CLI runs read these
        os.environ.pop(var, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def preset_dir(tmp_path_factory):
    """`preset_dir(name)`: a tiny preset written once per session by save_pretrained, for real from_pretrained loads."""
    root = tmp_path_factory.mktemp("presets")

    def get(name: str):
        from gradflow.setup.presets import build_preset

        directory = root / name
        if not (directory / "config.json").exists():
            build_preset(name, seed=0).save_pretrained(str(directory))
        return directory

    return get


def pytest_terminal_summary(terminalreporter):
    # issue 18's measure: how often the coverage fallback had to name parameters no other finding explained
    from tests.helpers.coverage import SEEN, fallback_count

    if SEEN:
        found, tests = fallback_count()
        terminalreporter.write_line(f"coverage: {len(SEEN)} probe reports checked, grad-missing-unexplained "
                                    f"{found} time(s) in {tests} test(s)")
        for test in sorted({test for (test, _), n in SEEN.items() if n}):
            terminalreporter.write_line(f"  grad-missing-unexplained in {test}")
