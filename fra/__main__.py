"""`python -m fra` is the `fra` command."""

import sys

from fra.cli import main

sys.exit(main())
