"""Text at 80 columns: every line of probe-backward / patch / inspect fits, wrapped at spaces and commas and never
inside a word (a single token wider than 80 stays whole on its own line), and patch's code block is the same
Python at 80 columns."""

from __future__ import annotations

import ast

import pytest
from rich.console import Console
from rich.text import Text

from gradflow.fixes._code import fit_code
from gradflow.report.render.patch import SNIPPET_END, SNIPPET_START
from gradflow.report.render.text import Lines, distributed_line
from tests.helpers.cli import invoke_main

SEED_BUG = "gradflow.demos:seed_bug"
LONG = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.default.weight"
HUGE = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.default.weight.with.a.very.long.suffix.beyond.80"


def assert_fits(text: str, width: int = 80) -> None:
    """Every line fits, or is one token (no space to break at) wider than the width, whole."""
    for line in text.splitlines():
        if len(line) > width:
            assert " " not in line.strip(), f"{len(line)} columns: {line!r}"


def _render(lines: Lines, width: int = 80) -> str:
    console = Console(width=width, file=None, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(lines, crop=False)
    return cap.get()


def test_long_names_wrap_between_words_never_inside_one():
    message = f"16 lora_A weights (first at {LONG}, {LONG}) got an exactly-zero first gradient, and {HUGE} too"
    text = _render(Lines().add(Text("info    GF301"), Text(message)))
    assert_fits(text)
    words = " ".join(text.split())  # every word printed whole: the same words in the same order
    assert words == " ".join(f"info GF301 {message}".split())
    assert any(line.strip() == HUGE for line in text.splitlines())  # wider than 80: whole, on its own line


def test_code_fits_80_columns_as_the_same_python():
    code = ["import torch",
            "def cast_inputs_float32(module, args):  # F.linear refuses a float16 input with float32 weights",
            "    return tuple(a.float() if torch.is_tensor(a) and a.dtype in (torch.float16, torch.bfloat16) else a "
            "for a in args)",
            f"for name in {[LONG, LONG + '_b', LONG + '_c']!r}:",
            "    model.get_parameter(name).requires_grad_(False)",
            f"model.get_submodule({HUGE!r}).register_forward_hook(make_inputs_require_grads, with_kwargs=True)",
            "# reentrant-checkpoint-no-input-grad: Make the inputs of reentrant checkpointed regions require grad "
            "(input-grad hook)"]
    fitted = fit_code(code)
    assert ast.dump(ast.parse("\n".join(fitted))) == ast.dump(ast.parse("\n".join(code)))  # the same Python
    # wider than 80 only where a string literal alone is (nearly) that wide: whole, on a line it starts
    strings = [repr(s) for s in (LONG, LONG + "_b", LONG + "_c", HUGE)]
    wide = [line for line in fitted if len(line) > 80]
    assert len(wide) == 4 and all(any(line.lstrip().startswith(s) for s in strings) for line in wide), wide
    assert fitted[1:3] == ["# F.linear refuses a float16 input with float32 weights",  # the comment, above
                           "def cast_inputs_float32(module, args):"]
    assert fitted[-2:] == ["# reentrant-checkpoint-no-input-grad: Make the inputs of reentrant checkpointed",
                           "# regions require grad (input-grad hook)"]
    assert fit_code(["x = 1  # short"]) == ["x = 1  # short"]


def test_the_distributed_line_fits():
    chunks = distributed_line({"world_size": 8, "backend": "nccl", "wrapper": "fsdp",
                               "batch": "the same on every rank", "ranks_disagree_count": 3,
                               "findings_on_some_ranks": [{}, {}]})
    text = _render(Lines(indent=2).add(*chunks, indent=2))
    assert_fits(text)
    assert text.startswith("distributed: FSDP2 on 8 ranks (nccl)  batch: the same on every rank")
    assert "3 parameter(s) differ between ranks" in text and "2 finding(s) on some ranks only" in text
    assert distributed_line(None) is None


def _snippet(stdout: str) -> str:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(SNIPPET_START))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(SNIPPET_END))
    return "\n".join(lines[start + 1:end])


@pytest.mark.parametrize("args", [
    ["probe-backward", SEED_BUG], ["inspect", SEED_BUG], ["patch", SEED_BUG],
    ["probe-backward", "tiny-llama"], ["inspect", "tiny-llama"],
    ["patch", "tiny-llama", "--trainable", "lora_|embed_tokens"],
    ["patch", "tiny-phi3", "--gc", "reentrant", "--trainable", "lora_|embed_tokens|lm_head"],
])
def test_every_line_of_the_text_report_fits_80_columns(args):
    run = invoke_main(*args, env={"COLUMNS": "80"})
    assert run.code in (0, 1), run.stderr[-2000:]
    assert_fits(run.stdout)
    if args[0] == "patch" and SNIPPET_START in run.stdout:
        code = _snippet(run.stdout)
        ast.parse(code)  # still Python, as printed
        assert max(map(len, code.splitlines())) <= 80
