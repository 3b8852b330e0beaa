"""`opt`: a config field with its help text, so that each stage's config dataclass is also the
source of its command line (`fra.cli.add_config_args` reads the help from the field)."""

from __future__ import annotations

import dataclasses


def opt(default, help: str):
    """A dataclass field with a default and a one-sentence help text for `fra <stage> --help`."""
    return dataclasses.field(default=default, metadata={"help": help})
