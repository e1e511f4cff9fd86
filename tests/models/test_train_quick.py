"""`specrelay models train --quick` then `specrelay models eval`, end to end into a temp dir (never models/)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specrelay", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    result = run_cli("models", "train", "--quick", "--out", str(out), "--threads", "1")
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_quick_train_writes_two_loadable_directories(quick_pair):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, stdout = quick_pair
    assert "done in" in stdout
    report = json.loads((out / "train_report.json").read_text())
    assert report["draft"]["params"] * 8 <= report["target"]["params"]
    ids = torch.tensor([[1, 10, 11, 12]])
    for name in ("target", "draft"):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tokenizer = AutoTokenizer.from_pretrained(out / name)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert tokenizer.chat_template and "<tools>" in tokenizer.chat_template
        assert model(input_ids=ids).logits.shape == (1, 4, len(tokenizer))
    # both share one tokenizer
    assert (out / "target" / "tokenizer.json").read_bytes() == (out / "draft" / "tokenizer.json").read_bytes()


def test_quick_train_is_reproducible_for_a_seed(quick_pair, tmp_path):
    out, _ = quick_pair
    again = run_cli("models", "train", "--quick", "--out", str(tmp_path), "--threads", "1")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "draft" / "model.safetensors").read_bytes() == \
        (out / "draft" / "model.safetensors").read_bytes()


def test_eval_writes_the_agreed_json_and_prints_a_table(quick_pair, tmp_path):
    out, _ = quick_pair
    result_file = tmp_path / "eval.json"
    result = run_cli("models", "eval", "--models", str(out), "--json", str(result_file), "--tool-prompts", "2")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result_file.read_text())
    assert set(figures) == {"target", "draft"}
    assert set(figures["target"]) == {"val_loss", "tool_call_valid_rate"}
    assert set(figures["draft"]) == {"val_loss", "top1_agreement"}
    assert 0.0 <= figures["target"]["tool_call_valid_rate"] <= 1.0 and 0.0 <= figures["draft"]["top1_agreement"] <= 1.0
    assert figures["target"]["val_loss"] > 0 and figures["draft"]["val_loss"] > 0
    assert "top1_agreement" in result.stdout and f"{figures['draft']['top1_agreement']:.4f}" in result.stdout


def test_eval_of_a_missing_directory_is_a_one_line_error(tmp_path):
    result = run_cli("models", "eval", "--models", str(tmp_path))
    assert result.returncode == 2
    assert "no config.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1
