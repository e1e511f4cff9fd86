"""A GGUF file's tensors as Hugging Face Llama-family tensors: dequantized to float32, renamed, and un-permuted.

llama.cpp names tensors `blk.N.attn_q.weight` where transformers says `model.layers.N.self_attn.q_proj.weight`, and
its converter (convert_hf_to_gguf.py, `LlamaModel.modify_tensors`) reorders the rows of a Llama's q and k
projections from the half-split RoPE layout transformers uses to the interleaved pairs llama.cpp rotates. Qwen2 and
Qwen3 use the half-split layout in llama.cpp too (NEOX RoPE), so their rows are stored as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from specrelay.shared.errors import ModelLoadError

# GGUF tensor name (after blk.N.) -> HF name (after model.layers.N.)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
INTEGER_TYPES = {"I8", "I16", "I32", "I64"}
PERMUTED_ARCHS = {"llama"}  # the converter permutes q/k rows only for these (LlamaModel and its subclasses)
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP = re.compile(r"(\w+)\.(weight|bias)")


def hf_name(name: str, path: Path) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; an unknown tensor is an error."""
    if (m := _LAYER.fullmatch(name)) and m[2] in LAYER_NAMES:
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.{m[3]}"
    if (m := _TOP.fullmatch(name)) and m[1] in TOP_NAMES:
        return f"{TOP_NAMES[m[1]]}.{m[2]}"
    if name == "rope_freqs.weight":
        raise ModelLoadError(f"{path}: tensor 'rope_freqs.weight' (Llama 3 rope scaling stored as frequency factors) "
                             "is not supported")
    raise ModelLoadError(f"{path}: tensor {name!r} has no counterpart in a Llama/Qwen2/Qwen3 model")


def dequantize(tensor, path: Path) -> np.ndarray:
    """One GGUF tensor as float32 in PyTorch's [out_features, in_features] order (GGUF lists dims innermost first)."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if qtype.name in INTEGER_TYPES:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} is of integer type {qtype.name}, not a weight type "
                             f"(supported: {', '.join(supported_types())})")
    if qtype == GGMLQuantizationType.F64:
        values = np.asarray(tensor.data, dtype=np.float64)
    else:
        try:
            values = quants.dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} is of type {qtype.name}, which cannot be "
                                 f"dequantized (supported: {', '.join(supported_types())})") from None
    return np.array(values, dtype=np.float32).reshape(shape)  # a copy: F32 data is a read-only view of the file


def supported_types() -> list[str]:
    from gguf import quants

    return ["F32", "F16", "F64", *sorted(t.name for t in quants._type_traits)]


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)`: per head, rows (pair, 2) back to (2, pair).

    The converter wrote w.reshape(heads, 2, half, ...).swapaxes(1, 2): row 2i+j of a head came from row j*half+i.
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def read_tensors(reader, path: Path, arch: str, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor of the file, by HF name, float32."""
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, path)
        weight = torch.from_numpy(dequantize(tensor, path))
        if arch in PERMUTED_ARCHS and (".q_proj." in name or ".k_proj." in name):
            weight = unpermute_rows(weight, num_heads if ".q_proj." in name else num_kv_heads)
        out[name] = weight.contiguous()
    return out
