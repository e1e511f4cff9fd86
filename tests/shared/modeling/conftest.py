"""Tiny random-initialised models of every supported family, saved with transformers' own save_pretrained."""

from __future__ import annotations

import pytest
import torch

VOCAB = 101
# A wide init gives peaked logits, so greedy never hinges on a near-tie; no eos, so generate runs all its tokens.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, eos_token_id=None)


def family_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}
    return {
        "llama": LlamaConfig(**COMMON),
        "llama3-rope": LlamaConfig(**COMMON, rope_scaling=llama3_rope, rope_theta=500000.0),
        "mistral": MistralConfig(**COMMON),
        "qwen2-tied": Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**COMMON, head_dim=16),
    }


FAMILIES = list(family_configs())


def save_models(tmp_path_factory, configs: dict, first_seed: int) -> dict:
    """name -> (directory, transformers model in eval mode): each config random-initialised (seeds from
    `first_seed`) and saved by transformers' own save_pretrained."""
    from transformers import AutoModelForCausalLM

    out = {}
    for i, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(first_seed + i)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory):
    """family -> (directory, transformers model in eval mode)."""
    return save_models(tmp_path_factory, family_configs(), first_seed=1000)
