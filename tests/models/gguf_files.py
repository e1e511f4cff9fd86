"""GGUF files for the import tests, written the way llama.cpp's convert_hf_to_gguf.py writes them: gguf's own
GGUFWriter, gguf's own HF -> GGUF tensor names (`get_tensor_name_map`), Llama q/k rows permuted for llama.cpp's
RoPE, 1-D tensors (norms, biases) left in F32, the vocabulary from a `tokenizers` file as a gpt2 (byte-level) one.

Every 2-D weight is stored in the chosen type. `reference_weights` gives what those stored values dequantize to,
by transformers' own dequantizer where it has the type (an implementation independent of the importer's).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
# K-quants: gguf can read them but not write them. Random blocks with these fp16 fields (byte offsets) fixed.
K_QUANT_HALVES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def writable_types() -> list[Q]:
    """Every type gguf's quantizer writes (probed: the set grows with the library)."""
    sample = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    types = []
    for qtype in Q:
        try:
            gguf.quants.quantize(sample, qtype)
        except (NotImplementedError, ValueError, TypeError):
            continue
        types.append(qtype)
    return types


def permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: per head, the half-split RoPE rows interleaved in pairs."""
    return rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(
        rows.shape)


def _dequantize(stored: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    from transformers.integrations.gguf import dequant

    if qtype.value in dequant.GGML_BLOCK:
        flat = dequant.dequantize(torch.from_numpy(np.ascontiguousarray(stored)).reshape(-1), qtype.value)
        return flat.reshape(shape).float()
    return torch.from_numpy(np.array(gguf.quants.dequantize(stored, qtype), dtype=np.float32)).reshape(shape)


def _random_k_blocks(shape: tuple[int, int], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant rows whose values have a standard deviation near 0.05 (the format is linear in its fp16
    scales, so scaling them scales every value)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block_elems, block_bytes), dtype=np.uint8)

    def set_halves(value: float) -> None:
        for offset in K_QUANT_HALVES[qtype]:
            blocks[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)

    set_halves(1.0)
    std = float(np.std(gguf.quants.dequantize(blocks, qtype)))
    set_halves(0.05 / std)
    return blocks.reshape(shape[0], -1)


def store(weight: torch.Tensor, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """(what the file stores for this 2-D weight, the float32 weight that it dequantizes to)."""
    shape = tuple(weight.shape)
    if qtype in K_QUANT_HALVES:
        stored = _random_k_blocks(shape, qtype, rng)
    else:
        stored = gguf.quants.quantize(weight.detach().float().numpy(), qtype)
    return stored, _dequantize(stored, qtype, shape)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, pre: str = "smollm") -> None:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    added = {t["content"]: t["special"] for t in data["added_tokens"]}
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if added.get(t) else gguf.TokenType.USER_DEFINED if t in added
                            else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]])
    writer.add_eos_token_id(vocab[config["eos_token"]])
    writer.add_pad_token_id(vocab[config["pad_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(config["chat_template"])


def write_gguf(path: Path, model, arch: str, qtype: Q | list[Q], tokenizer_dir: Path,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Write `model` (a transformers Llama/Qwen2/Qwen3) as a GGUF in `qtype` (a list: the 2-D weights take its
    types in turn, a mixed file like llama.cpp's quantizations); returns the reference state dict: the model's own
    tensors with every stored 2-D weight replaced by what the file holds, dequantized."""
    cfg = model.config
    qtypes = qtype if isinstance(qtype, list) else [qtype]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_tokenizer(writer, tokenizer_dir)
    names = gguf.get_tensor_name_map(ARCHS[arch], cfg.num_hidden_layers)
    reference, num_stored = {}, 0
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if tensor.dim() == 1:
            stored, reference[name] = tensor.float().numpy(), tensor.float()
        else:
            qtype, num_stored = qtypes[num_stored % len(qtypes)], num_stored + 1
            stored, reference[name] = store(tensor, qtype, rng)
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads
            stored = permute(stored, heads)
        writer.add_tensor(gguf_name, stored, raw_dtype=None if tensor.dim() == 1 or qtype == Q.F32 else qtype)
    assert num_stored >= len(qtypes), f"{num_stored} weights cannot show {len(qtypes)} types"
    if cfg.tie_word_embeddings:
        reference["lm_head.weight"] = reference["model.embed_tokens.weight"]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference
