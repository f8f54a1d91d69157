"""`python -m prunelab ...`: the same command line as `prunelab ...`."""

from .cli import main

main()
