"""The JSON schema of the report, shipped in the package (gradflow/report/report.schema.json)."""

from __future__ import annotations

import json
from importlib import resources

SCHEMA_FILE = "report.schema.json"


def schema() -> dict:
    """The JSON schema (draft 2020-12) that every `--format json` report and `Report.to_dict()` follow.

    Returns:
        The schema as a dict, read from the installed package, so it always matches this version of gradflow.
        The file itself: `importlib.resources.files("gradflow.report") / "report.schema.json"`.
    """
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))
