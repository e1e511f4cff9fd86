"""The common tail of every bench: the goals, then the report as JSON where asked."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def finish_report(report: dict, json_path: Path | None) -> None:
    """Print each goal met or not, then write the report as JSON where asked."""
    for name, met in report["goals"].items():
        print(f"goal {name}: {'met' if met else 'NOT met'}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
