"""`specrelay models eval --model DIR`: one model directory's tool-call validity, its prompts rendered as the gateway
renders them (the Hermes tools block on a template without one)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from specrelay.models.cli import DEFAULT_MODELS_DIR, add_arguments
from specrelay.models.evaluate import EvalConfig, evaluate

TARGET = DEFAULT_MODELS_DIR / "target"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specrelay", *args], capture_output=True, text=True, timeout=300)


def test_one_model_directory_gets_its_tool_call_validity_alone(tmp_path):
    result_file = tmp_path / "eval.json"
    result = run_cli("models", "eval", "--model", str(TARGET), "--tool-prompts", "3", "--json", str(result_file),
                     "--details", "--threads", "1")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result_file.read_text())
    assert list(figures) == ["model"] and list(figures["model"]) == ["tool_call_valid_rate"]
    rate = figures["model"]["tool_call_valid_rate"]
    assert rate in (0.0, 1 / 3, 2 / 3, 1.0)
    row = next(line.split() for line in result.stdout.splitlines() if "tool_call_valid_rate" in line)
    assert row == ["model", "tool_call_valid_rate", f"{rate:.4f}"]  # measured, with no goal column
    assert "first_call_exact_rate" in result.stdout


def test_the_gateway_rendering_gives_the_pair_the_same_figure_as_its_own_template():
    """On a template with a tools section the gateway's prompt is transformers' prompt, so the single-model figure
    is the pair's target figure, prompt for prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specrelay.models.evaluate import tool_call_rates

    cfg = EvalConfig(models_dir=TARGET, single=True, num_tool_prompts=3)
    figures, details = evaluate(cfg)
    model = AutoModelForCausalLM.from_pretrained(TARGET, dtype="float32").eval()
    assert (figures["model"]["tool_call_valid_rate"], details["first_call_exact_rate"]) == \
        tool_call_rates(model, AutoTokenizer.from_pretrained(TARGET), cfg)


def test_model_and_models_cannot_be_given_together(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["eval", "--model", str(TARGET), "--models", str(DEFAULT_MODELS_DIR)])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_directory_without_a_model_is_a_one_line_error(tmp_path):
    result = run_cli("models", "eval", "--model", str(tmp_path))
    assert result.returncode == 2
    assert "no config.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1
