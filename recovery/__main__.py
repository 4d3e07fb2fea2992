"""`python -m recovery` is the `recovery` command."""

from recovery.cli import main

main()
