"""An EAGLE-style draft head (EAGLE, arXiv 2401.15077; its pruned draft vocabulary as in EAGLE-3 / FR-Spec).

One Llama decoder layer over fc([embedding of the next token ; the target's last hidden state]) predicts the
target's next hidden state; the target's own LM head, cut to the `draft_vocab` most frequent tokens of the target's
outputs, turns it into draft logits. The head owns only fc and the layer (a few MB): the embeddings and LM head are
the target's, bound at load time (`bind`), so SmolLM2's 49k x 576 table is neither shipped nor multiplied in full.

    f'_{t+1} = Layer(fc([E(x_{t+1}) ; h_t]))          draft logits at t+1 = W_lm[vocab_ids] · f'_{t+1}

Past the root, a draft node feeds its parent's predicted feature f' in place of the target's h. The layer attends
over the head's own keys and values of earlier positions (the generated text since the prompt's last token).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specrelay.shared.modeling.llama import MLP, LlamaForCausalLM, RMSNorm
from specrelay.shared.modeling.rope import apply_rope, rope_cos_sin

WEIGHTS, CONFIG = "head.safetensors", "head_config.json"


@dataclass
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # the target's
    draft_vocab: int  # rows of the target's LM head the head scores

    @classmethod
    def for_target(cls, target: LlamaForCausalLM, draft_vocab: int) -> HeadConfig:
        c = target.config
        return cls(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                   c.rope_theta, c.vocab_size, min(draft_vocab, c.vocab_size))


class _MlpConfig:  # what llama.MLP reads
    def __init__(self, cfg: HeadConfig):
        self.hidden_size, self.intermediate_size, self.mlp_bias = cfg.hidden_size, cfg.intermediate_size, False


class DraftHead(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        kv = cfg.num_kv_heads * cfg.head_dim
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(d, h + 2 * kv, bias=False)
        self.o_proj = nn.Linear(h, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = MLP(_MlpConfig(cfg))
        self.register_buffer("vocab_ids", torch.arange(cfg.draft_vocab))  # draft index -> target token id
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.embed: torch.Tensor | None = None  # [vocab, d] the target's, bound by `bind`
        self.lm_weight: torch.Tensor | None = None  # [draft_vocab, d] the target's LM head rows of vocab_ids

    def bind(self, target: LlamaForCausalLM) -> DraftHead:
        return self.bind_tensors(target.model.embed_tokens.weight.detach(), target.lm_head.weight.detach())

    def bind_tensors(self, embed: torch.Tensor, lm_head: torch.Tensor) -> DraftHead:
        """embed, lm_head: [vocab, d], the target's (the same tensor when tied)."""
        self.embed = embed.float()
        self.lm_weight = lm_head[self.vocab_ids].float().contiguous()
        return self

    def qkv(self, feature: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor):
        """feature: [n, d] (h or f' of the previous position); tokens, positions: [n] -> x, q, k, v with
        x: [n, d] the residual stream, q: [n, H, D], k, v: [n, H_kv, D]."""
        c = self.cfg
        x = self.fc(torch.cat([self.embed[tokens].float(), feature.float()], dim=-1))
        qkv = self.qkv_proj(self.input_layernorm(x))
        h, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        q = apply_rope(qkv[:, :h].reshape(-1, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(qkv[:, h : h + kv].reshape(-1, c.num_kv_heads, c.head_dim), cos, sin)
        return x, q, k, qkv[:, h + kv :].reshape(-1, c.num_kv_heads, c.head_dim)

    def finish(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """x: [n, d]; q: [n, H, D]; keys, values: [m, H_kv, D] every visible position; mask: [n, m] bool or None
        (all visible) -> the predicted features f' [n, d]."""
        att = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                             values.transpose(0, 1)[None], attn_mask=mask,
                                             enable_gqa=True)[0].transpose(0, 1)  # [n, H, D]
        x = x + self.o_proj(att.reshape(x.shape[0], -1))
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, feature: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Teacher-forced over one sequence (training): feature [T, d] = h_t, tokens [T] = x_{t+1} -> f' [T, d],
        position t attending to positions ≤ t."""
        x, q, k, v = self.qkv(feature, tokens, positions)
        causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool, device=x.device).tril()
        return self.finish(x, q, k, v, causal)

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        """[n, d] -> [n, draft_vocab] float32."""
        return feature.float() @ self.lm_weight.T

    def save(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS))
        (out_dir / CONFIG).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def load(cls, head_dir: Path, model_dir: Path) -> DraftHead:
        """The head in `head_dir`, bound to the embeddings and LM head of the target in `model_dir` (read alone,
        not the whole model)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from specrelay.shared.errors import ConfigError, ModelLoadError
        from specrelay.shared.modeling.config import ModelConfig
        from specrelay.shared.modeling.loader import safetensors_files

        try:
            cfg = HeadConfig(**json.loads((head_dir / CONFIG).read_text()))
            state = load_file(str(head_dir / WEIGHTS))
        except (OSError, ValueError, TypeError) as e:
            raise ModelLoadError(f"draft head {head_dir}: cannot read it ({e})") from None
        target = ModelConfig.from_dir(str(model_dir))
        if (cfg.hidden_size, cfg.vocab_size) != (target.hidden_size, target.vocab_size):
            raise ConfigError(f"draft head {head_dir} was trained for another model (hidden {cfg.hidden_size}, "
                              f"vocabulary {cfg.vocab_size}); {model_dir.name} has {target.hidden_size}, "
                              f"{target.vocab_size}")
        embed = lm_head = None
        for path in safetensors_files(model_dir):
            with safe_open(str(path), "pt") as f:
                names = set(f.keys())
                embed = f.get_tensor("model.embed_tokens.weight") if "model.embed_tokens.weight" in names else embed
                lm_head = f.get_tensor("lm_head.weight") if "lm_head.weight" in names else lm_head
        if embed is None:
            raise ModelLoadError(f"{model_dir}: no model.embed_tokens.weight for the draft head")
        head = cls(cfg)
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return head.eval().bind_tensors(embed, lm_head if lm_head is not None else embed)
