"""Flags that several commands take, declared once here: the bus (`--redis`) and the torch device (`--device`).
Each command's `add_arguments` calls these; services/config.py lists which command builds which config from them.
"""

from __future__ import annotations

import argparse
import os

REDIS_ENV = "SPECRELAY_REDIS"


def add_redis_argument(parser: argparse.ArgumentParser, what: str = "the bus", from_env: bool = True) -> None:
    """--redis URL. A command that only runs over Redis reads $SPECRELAY_REDIS when the flag is absent; one that
    runs in-process without it (serve, gateway) does not, so a variable left in the shell cannot move it to Redis."""
    if from_env:
        parser.add_argument("--redis", default=os.environ.get(REDIS_ENV), metavar="URL",
                            help=f"{what} (or ${REDIS_ENV})")
    else:
        parser.add_argument("--redis", default=None, metavar="URL", help=f"{what} (default: in-process)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
