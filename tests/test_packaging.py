"""The package as a user gets it: publishable metadata, one project address, and the README's install command
building a wheel that runs outside the source tree.

The install test runs the README's `pip install .` (offline: `--no-deps --no-build-isolation`) from a copy of the
tree into a fresh virtual environment that sees the stack's installed dependencies through a .pth line, then runs
`gradflow --help`, a probe and `gradflow.schema()` from another directory, with nothing of the source on sys.path.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import gradflow
from gradflow.report import Report
from gradflow.report.render.sarif import to_sarif
from tests.helpers.env import REPO, child_env

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
HOME = PROJECT["urls"]["Homepage"]
# what a fresh clone has: the copy leaves out environments, build outputs and caches
CLONE_IGNORES = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "runs", "out",
                                       ".carry", ".gl")


def readme_install() -> list[str]:
    """The README's install command: the `pip install` line of the Install section's shell block."""
    section = (REPO / "README.md").read_text().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    lines = [line.partition(" #")[0].strip() for line in block.splitlines()]
    (line,) = [line for line in lines if line.startswith("pip install")]
    return shlex.split(line)


def test_the_metadata_is_ready_to_publish():
    assert PROJECT["name"] == "gradflow-doctor" and PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    assert PROJECT["authors"] and PROJECT["keywords"] and PROJECT["readme"] == "README.md"
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in PROJECT["classifiers"])
    assert {"Homepage", "Repository", "Issues", "Documentation"} <= set(PROJECT["urls"])
    deps = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0]: d for d in PROJECT["dependencies"]}
    assert deps["torch"] == "torch>=2.4,<2.14" and deps["typer"] == "typer>=0.29,<0.30"  # tested ranges


def test_the_stack_satisfies_every_dependency():
    """What the install test reuses instead of downloading: each requirement holds for the installed stack."""
    from packaging.requirements import Requirement

    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            installed = metadata.version(req.name)
            assert req.specifier.contains(installed, prereleases=True), (line, installed)


def test_one_project_address():
    assert gradflow.schema()["$id"].startswith(HOME + "/blob/main/")
    report = Report.from_dict(json.loads((REPO / "tests" / "golden" / "new" / "probe_tiny_llama.json").read_text()))
    assert to_sarif(report)["runs"][0]["tool"]["driver"]["informationUri"] == HOME
    assert f"git+{HOME}" in (REPO / "README.md").read_text()


def test_the_schema_is_package_data():
    from importlib import resources

    shipped = resources.files("gradflow.report").joinpath("report.schema.json")
    assert json.loads(shipped.read_text()) == gradflow.schema()
    assert not (REPO / "docs" / "report.schema.json").exists()  # one copy: the packaged one


def _sh(*argv, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.mark.slow
def test_the_readme_install_builds_a_wheel_that_runs_outside_the_source_tree(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # the build backend, used from the stack (no download)
    src, venv, elsewhere = tmp_path / "clone", tmp_path / "venv", tmp_path / "elsewhere"
    shutil.copytree(REPO, src, ignore=CLONE_IGNORES)
    elsewhere.mkdir()
    env = child_env(PYTHONPATH=None)  # nothing of the source tree on sys.path
    _sh(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(_sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # the stack's packages, after the venv's own; a plain path line runs none of their .pth files, so the stack's
    # editable gradflow stays out
    stack = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "_stack.pth").write_text("".join(f"{path}\n" for path in stack))

    argv = readme_install()
    assert argv == ["pip", "install", "."]
    # offline: dependencies come from the stack, and so does the build backend
    _sh(sys.executable, "-m", "pip", "--python", python, argv[1], "--quiet", "--no-deps", "--no-build-isolation",
        "--ignore-installed", *argv[2:], cwd=src, env=env)

    helped = _sh(venv / "bin" / "gradflow", "--help", cwd=elsewhere, env=env)
    assert "probe-backward" in helped.stdout
    probe = _sh(venv / "bin" / "gradflow", "probe-backward", "tiny-llama", "--format", "json", cwd=elsewhere, env=env)
    where = _sh(python, "-c", "import gradflow, json; from importlib import resources; print(json.dumps([gradflow"
                ".__file__, gradflow.schema(), resources.files('gradflow.report').joinpath('report.schema.json')"
                ".read_text()]))", cwd=elsewhere, env=env)
    module, schema, resource = json.loads(where.stdout)
    assert Path(module).is_relative_to(site), module  # the installed wheel, not the source
    assert schema == json.loads(resource) == gradflow.schema()
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(schema).validate(json.loads(probe.stdout))
    assert list(site.glob("gradflow_doctor-*.dist-info/licenses/LICENSE"))


@pytest.mark.slow
def test_the_sdist_holds_what_the_readme_links(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    src = tmp_path / "clone"
    shutil.copytree(REPO, src, ignore=CLONE_IGNORES)
    _sh(sys.executable, "-c", "from setuptools import build_meta; print(build_meta.build_sdist('dist'))", cwd=src,
        env=child_env(PYTHONPATH=None))
    (sdist,) = (src / "dist").glob("gradflow_doctor-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    links = set(re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text()))
    assert links and links <= names, links - names
    assert {"LICENSE", "docs/ci.md", "gradflow/report/report.schema.json", "gradflow/data/think_demo.jsonl"} <= names
