"""`python -m fra` is the `fra` command."""

from fra.cli import main

main()
