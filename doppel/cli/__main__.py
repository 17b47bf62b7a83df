"""`python -m doppel.cli`: the same command line as the `doppel` entry point."""

from doppel.cli import main

main()
