"""`python -m gradflow`: the same entry point as the `gradflow` console script."""

from gradflow.cli import main

if __name__ == "__main__":
    main()
