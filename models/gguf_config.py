"""config.json and generation_config.json of a Hugging Face directory, rebuilt from a GGUF file's metadata.

The keys are llama.cpp's (`<arch>.embedding_length`, `<arch>.attention.head_count_kv`, ...; see gguf's
`Keys.LLM`/`Keys.Attention`/`Keys.Rope`). What a GGUF does not state is inferred the way llama.cpp and
transformers' GGUF loader do: embeddings are tied when there is no `output.weight`; head_dim is
`attention.key_length`, else hidden_size / heads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from specrelay.shared.errors import ModelLoadError

# GGUF architecture -> (HF model_type, HF architecture class)
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM")}
SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                 "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p"}


def architecture(metadata: dict, path: Path) -> str:
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                             f"{', '.join(sorted(ARCHITECTURES))})")
    return arch


def _f32(value: float) -> float:
    """A float32 field as the decimal it was written from (9.999999747378752e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _one(value, key: str, path: Path) -> int:
    """A per-model count that some files store per layer: every layer must agree."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelLoadError(f"{path}: {key} differs between layers ({sorted(set(value))}); not supported")
        value = value[0]
    return int(value)


def build_config(metadata: dict, tensor_names: set[str], path: Path) -> dict:
    arch = architecture(metadata, path)
    model_type, class_name = ARCHITECTURES[arch]

    def get(key: str, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: metadata {arch}.{key} is missing")
        return value

    hidden = int(get("embedding_length"))
    heads = _one(get("attention.head_count"), f"{arch}.attention.head_count", path)
    kv_heads = _one(get("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv", path)
    head_dim = int(get("attention.key_length", hidden // heads))
    rotary = metadata.get(f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count {rotary} of head_dim "
                             f"{head_dim}) are not supported")
    vocab = metadata.get(f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or ())
    if not vocab:
        raise ModelLoadError(f"{path}: the vocabulary size is stated nowhere ({arch}.vocab_size, "
                             "tokenizer.ggml.tokens)")
    config = {
        "architectures": [class_name],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": _one(get("feed_forward_length"), f"{arch}.feed_forward_length", path),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(metadata, arch, path),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":  # Qwen2's q/k/v bias is implied by its model_type
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    if arch in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    return config


def _rope_scaling(metadata: dict, arch: str, path: Path) -> dict | None:
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(metadata[f"{arch}.rope.scaling.factor"])}
    raise ModelLoadError(f"{path}: rope scaling {kind!r} is not supported (supported: none, linear)")


def generation_config(metadata: dict) -> dict:
    """The end-of-sequence and end-of-turn tokens the file names, and the sampling settings its author recommends
    (`general.sampling.*`), if any; greedy otherwise, as transformers' default."""
    stops = [metadata.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    stops = list(dict.fromkeys(int(s) for s in stops if s is not None))
    out = {"do_sample": False, "eos_token_id": stops[0] if len(stops) == 1 else stops}
    for key, name in SAMPLING_KEYS.items():
        if metadata.get(key) is not None:
            out[name] = _f32(metadata[key]) if isinstance(metadata[key], float) else metadata[key]
    out["do_sample"] = out.get("temperature", 0) > 0
    for key, name in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        if metadata.get(f"tokenizer.ggml.{key}") is not None:
            out[name] = int(metadata[f"tokenizer.ggml.{key}"])
    return out
