"""The recipe file: the fixes a patch applied, as data, so that `train --recipe` can apply them to a fresh model.

```python
from gradflow.fixes.recipe_file import apply_recipe, load_recipe

recipe = load_recipe("out/patched")          # the directory `gradflow patch --save` wrote, or the JSON file
changes = apply_recipe(model, recipe)        # after the model is built, before the optimizer
```
"""

from __future__ import annotations

import dataclasses
import json
import os

from gradflow.errors import GradflowError
from gradflow.files import write_json
from gradflow.fixes import by_id
from gradflow.fixes._base import Env

RECIPE_FILE = "gradflow_recipe.json"
RECIPE_SCHEMA = 1
RECIPE_KIND = "gradflow-recipe"


@dataclasses.dataclass
class Recipe:
    """Fixes as data: each entry has the fix `id`, its `data`, `applicability` and the slugs it `answers`."""

    fixes: list[dict]
    source: str | None = None
    gradflow_version: str | None = None
    verified: bool | None = None
    path: str | None = None

    def to_dict(self) -> dict:
        from gradflow import __version__

        return {"kind": RECIPE_KIND, "schema_version": RECIPE_SCHEMA, "gradflow_version": __version__,
                "source": self.source, "verified": self.verified, "fixes": self.fixes}


def recipe_from_report(report, source: str | None = None) -> Recipe:
    """The applied fixes of a patch Report, as a Recipe."""
    fixes = [{"id": f["id"], "applicability": f["applicability"], "answers": list(f["answers"]), "data": f["data"]}
             for f in report.fixes_applied]
    verification = (report.patch.verification if report.patch is not None else None) or {}
    return Recipe(fixes=fixes, source=source, verified=verification.get("ok"))


def write_recipe(recipe: Recipe, path: str) -> str:
    """Write `recipe` to `path` (a directory gets gradflow_recipe.json), atomically; return the file path."""
    if os.path.isdir(path):
        path = os.path.join(path, RECIPE_FILE)
    write_json(path, recipe.to_dict())
    return path


def load_recipe(path: str) -> Recipe:
    """Read a recipe from a file or from the directory `gradflow patch --save` wrote.

    Raises:
        GradflowError: the file is missing, is not JSON, is not a gradflow recipe, or names an unknown fix.
    """
    file = os.path.join(path, RECIPE_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise GradflowError(f"no recipe at {file}", "Write one with: gradflow patch MODEL --save DIR")
    try:
        with open(file) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GradflowError(f"{file} is not valid JSON ({exc})", "Write it again with: gradflow patch MODEL --save DIR") from exc
    if not isinstance(data, dict) or data.get("kind") != RECIPE_KIND or not isinstance(data.get("fixes"), list):
        raise GradflowError(f"{file} is not a gradflow recipe", "Pass the gradflow_recipe.json that gradflow patch --save wrote")
    if data.get("schema_version") != RECIPE_SCHEMA:
        raise GradflowError(f"{file} has recipe schema {data.get('schema_version')!r}, this gradflow reads {RECIPE_SCHEMA}",
                            "Write it again with this gradflow: gradflow patch MODEL --save DIR")
    for i, entry in enumerate(data["fixes"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), dict):
            raise GradflowError(f"{file}: fix #{i + 1} has no data", "Write the recipe again with gradflow patch --save")
        fix = by_id(str(entry.get("id")))
        if fix is None or fix.apply is None:
            raise GradflowError(f"{file}: unknown fix {entry.get('id')!r}", "Run 'gradflow patch' again to write a current recipe")
    return Recipe(fixes=data["fixes"], source=data.get("source"), gradflow_version=data.get("gradflow_version"),
                  verified=data.get("verified"), path=file)


def apply_recipe(model, recipe: Recipe, batch=None) -> list[str]:
    """Apply the recipe's fixes to `model` in order; return what changed. Fixes already in effect change nothing."""
    env = Env(batch=batch)
    changed: list[str] = []
    for entry in recipe.fixes:
        fix = by_id(entry["id"])
        changed.extend(fix.apply(model, entry["data"], env))
    return changed


def check_save_dir(directory: str) -> None:
    """Fail early, before loading anything, when `--save DIR` cannot be a directory."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise GradflowError(f"--save {directory} is a file, not a directory", "Pass a new or existing directory")
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        raise GradflowError(f"--save {directory}: the parent directory {parent} does not exist", "Create it first")


def check_save_target(model, directory: str) -> None:
    """Fail before patching when `--save DIR` cannot be written for `model`."""
    check_save_dir(directory)
    if not hasattr(model, "save_pretrained"):
        raise GradflowError(f"--save: {type(model).__name__} has no save_pretrained",
                            "Use --save with a PEFT or transformers model, or save your model yourself")


def save_patched(model, report, directory: str, *, source: str | None = None, base_name: str | None = None) -> dict:
    """Write the patched adapter (save_pretrained) and the recipe into `directory`; return what was written.

    `base_name` (a preset name) is recorded as the adapter's base when the model does not name one, so that the
    directory can be loaded again by name.
    """
    check_save_target(model, directory)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    config_path = os.path.join(directory, "adapter_config.json")
    if base_name and os.path.isfile(config_path):
        # written after saving: PEFT would otherwise look the name up on the hub while saving
        with open(config_path) as fh:
            config = json.load(fh)
        if not config.get("base_model_name_or_path"):
            config["base_model_name_or_path"] = base_name
            with open(config_path, "w") as fh:
                json.dump(config, fh, indent=2, sort_keys=True)
    recipe_path = write_recipe(recipe_from_report(report, source), directory)
    return {"dir": directory, "files": sorted(os.listdir(directory)), "recipe": recipe_path}
