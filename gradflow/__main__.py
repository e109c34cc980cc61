"""`python -m gradflow`: the same entry point as the `gradflow` console script."""

from gradflow.cli import entry

if __name__ == "__main__":
    entry()
