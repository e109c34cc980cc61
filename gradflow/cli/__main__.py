"""`python -m gradflow.cli`: the same entry point as the `gradflow` console script."""

from gradflow.cli import entry

entry()
