"""Where a MODEL is written down: the file it came from and, by kind, the line in it that set a finding up.

A cheap scan, without importing or running anything:

- a factory (`path/file.py:func`, `package.module:func`): the function's source and the same-file functions it
  calls, for the line that made the model, wrapped it with PEFT, turned checkpointing on, built the optimizer or
  the Trainer, or froze parameters; a finding picks the kind of line that explains it
  (`reentrant-checkpoint-no-input-grad` → the `gradient_checkpointing_enable(...)` line). With no such line, the
  function's `def` line.
- a model directory or config.json: the config file, or an adapter directory's adapter_config.json (line 1, or
  the line of the key that matters, e.g. `"use_cache"`).
- a preset or hub id: no file (None).

gradflow.report.render.sarif turns this into SARIF locations.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from urllib.parse import quote, unquote

# what a line of factory code does, by the name it calls (the attribute or function name)
_CALL_KINDS = {
    "gc": {"gradient_checkpointing_enable", "gradient_checkpointing_disable", "enable_input_require_grads",
           "disable_input_require_grads", "checkpoint", "checkpoint_sequential"},
    "peft": {"get_peft_model", "add_adapter", "load_adapter", "inject_adapter_in_model", "PeftModel",
             "get_peft_model_state_dict"},
    "quant": {"BitsAndBytesConfig", "prepare_model_for_kbit_training"},
    "optimizer": {"AdamW", "Adam", "SGD", "Adafactor", "create_optimizer", "AdamW8bit", "PagedAdamW"},
    "trainer": {"Trainer", "SFTTrainer", "Seq2SeqTrainer", "DPOTrainer"},
    "args": {"TrainingArguments", "SFTConfig", "Seq2SeqTrainingArguments", "DPOConfig"},
    "freeze": {"requires_grad_"},
    "loss": {"cross_entropy", "CrossEntropyLoss", "nll_loss"},
    "model": {"from_pretrained", "from_config", "build_preset"},
}
# keyword arguments that set the same things inside a call (TrainingArguments(gradient_checkpointing=True, ...))
_KEYWORD_KINDS = {"gradient_checkpointing": "gc", "gradient_checkpointing_kwargs": "gc", "use_cache": "gc",
                  "peft_config": "peft", "quantization_config": "quant", "load_in_4bit": "quant",
                  "load_in_8bit": "quant", "optimizers": "optimizer", "is_trainable": "peft", "dtype": "dtype",
                  "torch_dtype": "dtype"}
_MODEL_CLASS = re.compile(r"(For[A-Z]\w*|Model|LM)$")  # AutoModelForCausalLM, LlamaForCausalLM(config), MyModel()

# which line explains a finding best, most telling first; the model's line (or the def line) otherwise
_WHERE = {
    "reentrant-checkpoint-no-input-grad": ("gc", "args", "peft"),
    "nested-checkpoint": ("gc", "args"),
    "use-cache-in-training": ("gc", "args"),
    "ddp-reentrant-checkpoint": ("gc", "args"),
    "checkpoint-changes-gradients": ("gc", "args"),
    "adapter-frozen": ("freeze", "peft"),
    "half-precision-trainable-params": ("dtype",),
    "lora-zero-init": ("peft",),
    "trainable-param-not-saved": ("freeze", "peft"),
    "intended-param-frozen": ("freeze", "peft"),
    "no-trainable-parameters": ("freeze", "peft"),
    "trainable-embeddings-costly": ("freeze", "peft"),
    "kbit-not-prepared": ("quant", "peft"),
    "param-not-in-optimizer": ("optimizer", "trainer"),
    "loss-detached": ("loss",),
    "no-supervised-tokens": ("loss", "trainer"),
    "ddp-unused-parameters": ("args", "trainer"),
}



class SourceLines:
    """A file (absolute `path`) and, by kind, the first line in it that does that kind of thing.

    `uri` is the file's path relative to the repository root (SARIF's %SRCROOT%) when it lies inside it, else None.
    """

    def __init__(self, path: str, lines: dict[str, int], default: int,
                 fallback: tuple[str, ...] = ("model", "trainer", "peft"), *, uri: str | None = None):
        self.path, self.lines, self.default, self.fallback, self.uri = path, lines, default, fallback, uri

    def line_for(self, slug: str) -> int:
        for kind in _WHERE.get(slug, ()) + self.fallback:
            if kind in self.lines:
                return self.lines[kind]
        return self.default

    def where(self, kind: str) -> str | None:
        """'path:LINE' of the first line of `kind` (relative to the repository root when inside it), or None."""
        if kind not in self.lines:
            return None
        return f"{unquote(self.uri) if self.uri else self.path}:{self.lines[kind]}"

    def physical(self, slug: str) -> dict:
        """A SARIF physicalLocation: `uri` under %SRCROOT%, at the line that explains `slug`."""
        return {"artifactLocation": {"uri": self.uri, "uriBaseId": "%SRCROOT%"},
                "region": {"startLine": max(1, self.line_for(slug))}}


_INSTALLED = ("site-packages", "dist-packages")  # where pip puts packages, a virtual environment's included


def relative_uri(path: str, root: str) -> str | None:
    """`path` as a URI reference relative to `root` (forward slashes), or None when it lies outside `root` or in an
    installed package (a virtual environment inside the repository holds no file of the repository)."""
    rel = os.path.relpath(os.path.abspath(path), root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    if any(part in _INSTALLED for part in rel.split(os.sep)):
        return None
    return quote(rel.replace(os.sep, "/"))


def installed_path(path: str) -> str | None:
    """The path of an installed package's file inside its site-packages (`gradflow/demos.py`), else None."""
    parts = os.path.abspath(path).split(os.sep)
    where = max((i for i, part in enumerate(parts) if part in _INSTALLED), default=None)
    return "/".join(parts[where + 1:]) if where is not None and where + 1 < len(parts) else None


def source_lines(source: str, *, root: str | None = None) -> SourceLines | None:
    """Where MODEL `source` is written down, or None (a preset, a hub id, or source that cannot be read).

    `root`: the repository root its `uri` is relative to (default: the working directory).
    """
    root = os.path.abspath(root or os.getcwd())
    try:
        if os.path.isdir(source):  # a model's config.json, else a PEFT adapter's adapter_config.json
            configs = [os.path.join(source, name) for name in ("config.json", "adapter_config.json")]
            return next((_config_lines(config, root) for config in configs if os.path.isfile(config)), None)
        if os.path.isfile(source) and source.lower().endswith(".json"):
            return _config_lines(source, root)
        if ":" in source:
            return _factory_lines(source, root)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None  # a location is a courtesy: never fail a report over it
    return None


def _config_lines(path: str, root: str) -> SourceLines:
    lines = {}
    with open(path, encoding="utf-8") as fh:
        for no, text in enumerate(fh, 1):
            for key, kind in (('"use_cache"', "gc"), ('"gradient_checkpointing"', "gc"),
                              ('"quantization_config"', "quant"), ('"torch_dtype"', "dtype"), ('"dtype"', "dtype")):
                if key in text:
                    lines.setdefault(kind, no)
    # other findings: the file's first line
    return SourceLines(os.path.abspath(path), lines, 1, fallback=(), uri=relative_uri(path, root))


def _factory_lines(spec: str, root: str) -> SourceLines | None:
    target, _, name = spec.rpartition(":")
    path = target if target.endswith(".py") else module_file(target)
    if not path or not os.path.isfile(path):
        return None
    tree = _parse(path)
    defs = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    start = defs.get(name)
    if start is None:  # a module-level object (MODEL = ..., SETUP = {...}): the module's own statements
        assigned = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    and any(isinstance(t, ast.Name) and t.id == name for t in _targets(n))]
        if not assigned:
            return None  # imported from elsewhere, or not there: no line to show
        statements = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and not _main_guard(n)]
        return SourceLines(os.path.abspath(path), _scan(statements, defs, set()), assigned[0].lineno,
                           uri=relative_uri(path, root))
    return SourceLines(os.path.abspath(path), _scan(start.body, defs, {name}), start.lineno,
                       uri=relative_uri(path, root))


# what a Trainer turns on from its arguments, inside train(): what a probe of the model alone cannot see
_TRAINER_SETTINGS = {"gradient_checkpointing": "checkpointing", "activation_checkpointing": "checkpointing",
                     "bf16": "mixed precision", "fp16": "mixed precision", "peft_config": "PEFT"}


def trainer_settings(spec: str, *, root: str | None = None) -> list[tuple[str, str, str]]:
    """What the file of factory `spec` turns on through a Trainer or its arguments, anywhere in the file (a script
    builds them in main(), beside the factory): [(what, the code, 'path:LINE')], e.g. ('checkpointing',
    'TrainingArguments(gradient_checkpointing=True)', 'train.py:22'). Empty when `spec` is no readable factory."""
    target, _, _ = spec.rpartition(":")
    path = target if target.endswith(".py") else module_file(target) if target else None
    try:
        tree = _parse(path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, TypeError):
        return []  # a note is a courtesy: never fail a report over it
    rel = os.path.relpath(path, os.path.abspath(root or os.getcwd()))
    shown = path if rel.startswith("..") else rel
    found = []
    for node in ast.walk(tree):
        called = _name(node.func) if isinstance(node, ast.Call) else None
        if called not in _CALL_KINDS["args"] | _CALL_KINDS["trainer"]:
            continue
        for kw in node.keywords:
            what = _TRAINER_SETTINGS.get(kw.arg)
            on = kw.arg == "peft_config" or (isinstance(kw.value, ast.Constant) and kw.value.value is True)
            if what and on and what not in {w for w, _, _ in found}:
                code = f"{called}({kw.arg}={'...' if kw.arg == 'peft_config' else 'True'})"
                found.append((what, code, f"{shown}:{kw.value.lineno}"))
    return found


def _parse(path: str) -> ast.Module:
    """The file's syntax tree, parsed once per content (a report asks up to three times: the note, the Trainer fix
    line, SARIF). Read-only to callers."""
    with open(path, encoding="utf-8") as fh:
        return _parse_text(fh.read(), os.path.abspath(path))


@functools.lru_cache(maxsize=8)
def _parse_text(text: str, path: str) -> ast.Module:
    return ast.parse(text, filename=path)


def _main_guard(node) -> bool:
    """`if __name__ == "__main__":` runs only as a script, never when gradflow imports the factory."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def _targets(node):
    return node.targets if isinstance(node, ast.Assign) else [node.target]


def module_file(module: str) -> str | None:
    """The file a module `module` is (or would be) imported from, or None."""
    import importlib.util
    import sys

    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__file__", None):
        return loaded.__file__
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return found.origin if found is not None and found.has_location else None


def _scan(body, defs: dict, seen: set) -> dict[str, int]:
    """The first line of each kind in `body`, in execution order: a call into another function of the same file
    is scanned where it is called (seed_bug → _seed_setup), each function once."""
    found: dict[str, int] = {}

    def note(kind: str, line: int) -> None:
        found.setdefault(kind, line)

    def visit(node) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            if not isinstance(node, ast.Lambda) and node.name not in defs:  # a nested helper: scan it in place
                for child in node.body:
                    visit(child)
            return
        if isinstance(node, ast.Call):
            for child in ast.iter_child_nodes(node):  # arguments run first: from_pretrained(...) inside a wrap
                visit(child)
            called = _name(node.func)
            for kind, names in _CALL_KINDS.items():
                if called in names:
                    note(kind, node.lineno)
            if called and called not in _CALL_KINDS["model"] and _MODEL_CLASS.search(called) and called[0].isupper():
                note("model", node.lineno)
            if called == "from_pretrained" and _name(getattr(node.func, "value", None)) in ("PeftModel",
                                                                                           "AutoPeftModelForCausalLM"):
                note("peft", node.lineno)
            for kw in node.keywords:
                if kw.arg in _KEYWORD_KINDS:
                    note(_KEYWORD_KINDS[kw.arg], kw.value.lineno)
            if called in defs and called not in seen:  # a helper in the same file: its lines are the factory's
                seen.add(called)
                sub = _scan(defs[called].body, defs, seen)
                for kind, line in sub.items():
                    note(kind, line)
            return
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for target in _targets(node) if not isinstance(node, ast.AugAssign) else [node.target]:
                if isinstance(target, ast.Attribute) and target.attr == "requires_grad":
                    note("freeze", node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for stmt in body:
        visit(stmt)
    return found


def _name(func) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None
