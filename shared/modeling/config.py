"""ModelConfig: the one description of a Llama-family model that the runtime needs, read from an HF config.json.

Supported: Llama 2/3 (rope_scaling `llama3`, `linear`), Mistral, Qwen2/2.5 (qkv bias, tied embeddings), Qwen3 (q/k
RMSNorm). Both the transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) spellings are read.

Sliding-window attention as transformers applies it: Mistral windows every layer whenever `sliding_window` is set;
Qwen2/Qwen3 only with `use_sliding_window`, and then only the layers `layer_types` marks "sliding_attention"
(by default those from `max_window_layers` on); Llama never.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from specrelay.shared.errors import ModelLoadError

# model_type -> (qkv bias by default, q/k norm)
FAMILIES = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}
ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
ROPE_TYPES = {"default", "linear", "llama3"}
LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "linear"|"llama3", ...} or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: bias on q/k/v; Llama with attention_bias: on q/k/v/o
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None  # keys visible to a query: the last `sliding_window` positions; None: every layer full
    layer_windows: tuple[int, ...]  # per layer: sliding_window, or 0 for full attention
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def max_model_len(self) -> int:
        """Longest sequence served (a sliding window limits what a layer attends to, not the length)."""
        return self.max_position_embeddings

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
        mlp = 3 * d * self.intermediate_size
        norms = 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + d + embed

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        model_type = raw.get("model_type")
        archs = raw.get("architectures") or []
        if model_type not in FAMILIES:
            raise ModelLoadError(
                f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
            )
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown:
            raise ModelLoadError(f"{source}: architecture {unknown[0]!r} is not supported "
                                 f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        try:
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            qkv_bias_default, qk_norm = FAMILIES[model_type]
            attention_bias = bool(raw.get("attention_bias", False))
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            num_layers = int(raw["num_hidden_layers"])
            window, layer_windows = _sliding_windows(raw, model_type, num_layers, source)
            theta, scaling = _rope_settings(raw, source)
            cfg = cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias_default or attention_bias,
                o_bias=attention_bias and model_type in ("llama", "qwen3"),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                qk_norm=qk_norm,
                sliding_window=window,
                layer_windows=layer_windows,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: required field {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: a field has the wrong type ({e})") from None
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{source}: hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads {cfg.num_heads} is not a multiple of "
                                 f"num_key_value_heads {cfg.num_kv_heads}")
        return cfg

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: not found (a model directory needs config.json)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))


def _sliding_windows(raw: dict, model_type: str, num_layers: int, source: str) -> tuple[int | None, tuple[int, ...]]:
    """(window, per-layer windows) the way transformers reads them; (None, all zeros) when no layer is windowed."""
    window = raw.get("sliding_window")
    if model_type == "mistral":  # MistralConfig has no use_sliding_window: a window applies to every layer
        windowed = [True] * num_layers
    elif model_type in ("qwen2", "qwen3") and raw.get("use_sliding_window", False):
        types = raw.get("layer_types") or ["sliding_attention" if i >= int(raw.get("max_window_layers", 28))
                                           else "full_attention" for i in range(num_layers)]  # fmt: skip
        if len(types) != num_layers or not set(types) <= LAYER_TYPES:
            raise ModelLoadError(f"{source}: layer_types must list {num_layers} of "
                                 f"{', '.join(sorted(LAYER_TYPES))}, got {types!r}")
        windowed = [t == "sliding_attention" for t in types]
    else:
        windowed = [False] * num_layers
    if window is None or not any(windowed):
        return None, (0,) * num_layers
    window = int(window)
    if window < 1:
        raise ModelLoadError(f"{source}: sliding_window must be a positive number of tokens, got {window}")
    return window, tuple(window if w else 0 for w in windowed)


def _rope_settings(raw: dict, source: str) -> tuple[float, dict | None]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params or None
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if scaling is None:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: rope scaling type {rope_type!r} is not supported "
                             f"(supported: {', '.join(sorted(ROPE_TYPES))})")
    if rope_type == "default":
        return theta, None
    return theta, {**{k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}, "rope_type": rope_type}
