"""`specrelay bench arrival` on the small pair: the JSON a user reads (whole-prompt and chunked rows, the stall
figures, the goals) and outputs unchanged by chunking. Never a time."""

from __future__ import annotations

import argparse
import json

import pytest

from specrelay.bench.arrival import add_arguments, main
from specrelay.models.resolve import PAIR_DIR

TARGET = PAIR_DIR / "target"
pytestmark = pytest.mark.skipif(not (TARGET / "config.json").is_file(), reason="embedded target not built")


def test_the_report_has_a_row_per_mode_with_its_figures_and_chunking_changes_no_output(tmp_path):
    out = tmp_path / "arrival.json"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(TARGET), "--streams", "2", "--stream-len", "24", "--long-len", "150",
                              "--chunks", "32,64", "--max-tokens", "12", "--json", str(out)])
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [r["chunk"] for r in report["rows"]] == [0, 32, 64]
    for row in report["rows"]:
        assert row["same_outputs"] is True
        assert row["long_ttft_ms"] > 0 and row["stall_itl_ms_max"] >= row["stall_itl_ms_p50"] > 0
    assert len(report["goals"]) == 2
