"""Load a Hugging Face model directory (config.json + one or several *.safetensors) into our LlamaForCausalLM.

Every failure names the file and what is wrong: a missing file, a corrupt safetensors header, a tensor that is
missing, unexpected, or of the wrong shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specrelay.shared.errors import ModelLoadError
from specrelay.shared.modeling.config import ModelConfig
from specrelay.shared.modeling.llama import LlamaForCausalLM
from specrelay.shared.modeling.rope import inv_frequencies

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# HF tensor-name piece -> (our fused parameter, index of the part in the fusion order)
FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
NUM_PARTS = {"self_attn.qkv_proj": 3, "mlp.gate_up_proj": 2}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """Default: float32 on CPU (bf16 matmuls are slow there), bfloat16 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported (use one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{missing[0]}: listed in {index.name} but not found")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights found (pytorch_model.bin is not read: "
                             "pickled weights are never loaded)")
    return files


def read_tensors(files: list[Path]) -> dict[str, tuple[torch.Tensor, Path]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, tuple[torch.Tensor, Path]] = {}
    for path in files:
        try:
            for name, tensor in load_file(str(path)).items():
                tensors[name] = (tensor, path)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{path}: cannot read safetensors ({e})") from None
    return tensors


def load_model(model_dir: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu") -> LlamaForCausalLM:
    model_dir = Path(model_dir)  # a directory: a --model flag resolves a .gguf or built-in name first (resolve.py)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory (expected a Hugging Face model directory)")
    cfg = ModelConfig.from_dir(model_dir)
    tensors = read_tensors(safetensors_files(model_dir))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    params = dict(model.named_parameters())
    parts: dict[str, dict[int, tuple[torch.Tensor, str, Path]]] = {}
    loaded: dict[str, torch.Tensor] = {}
    for name, (tensor, path) in tensors.items():
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        target, part = name, None
        for piece, (fused, index) in FUSED.items():
            if f".{piece}." in name:
                target, part = name.replace(piece, fused), index
        if target not in params:
            raise ModelLoadError(f"{path}: unexpected tensor {name!r} for a {cfg.model_type} model")
        if part is None:
            _check_shape(name, tensor, tuple(params[target].shape), path)
            loaded[target] = tensor
        else:
            parts.setdefault(target, {})[part] = (tensor, name, path)
    for target, pieces in parts.items():
        expected = next(n for fused, n in NUM_PARTS.items() if f".{fused}." in target)
        if len(pieces) != expected:
            missing = target.rsplit(".", 1)[0]
            raise ModelLoadError(f"{model_dir}: {missing} is incomplete (found {len(pieces)} of {expected} parts)")
        fused_shape = tuple(params[target].shape)
        tensors_in_order = [pieces[i][0] for i in range(expected)]
        if sum(t.shape[0] for t in tensors_in_order) != fused_shape[0] or any(
                t.shape[1:] != fused_shape[1:] for t in tensors_in_order):
            name, path = pieces[0][1], pieces[0][2]
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {tuple(tensors_in_order[0].shape)}, which does "
                                 f"not match config.json")
        loaded[target] = torch.cat(tensors_in_order, dim=0)
    missing = [n for n in params if n not in loaded and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise ModelLoadError(f"{model_dir}: weights missing from the safetensors files: {', '.join(missing[:5])}"
                             + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    model = model.to_empty(device=device).to(resolve_dtype(dtype, device))
    if cfg.tie_word_embeddings:  # to_empty replaces parameters module by module, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(loaded[name])
    model.inv_freq = inv_frequencies(cfg).to(device)  # float32 whatever the weights' dtype
    return model.eval()


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], path: Path) -> None:
    if tuple(tensor.shape) != expected:
        raise ModelLoadError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                             f"{expected}")
