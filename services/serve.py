"""`specrelay serve`: every service in one process over the local bus, serving the embedded pair by default."""

from __future__ import annotations

import argparse
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(MODELS_DIR / "target"), help="target model: a local HF directory")
    parser.add_argument("--draft", default=str(MODELS_DIR / "draft"), help="draft model: a local HF directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis", default=None, metavar="URL", help="talk over Redis instead of the local bus")


def main(args: argparse.Namespace) -> int:
    # The gateway lands with the services issue; until then this says what it will serve.
    print(f"specrelay serve: target {args.model}")
    print(f"specrelay serve: draft  {args.draft}")
    print(f"specrelay serve: would listen on http://{args.host}:{args.port}/v1 (the gateway is not built yet)")
    return 0
