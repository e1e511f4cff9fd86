"""Where relayed K/V deviate from a full prefill, layer by layer, on one model — and the recompute band chosen
from that measurement, cached once per model like the PTE profile (shared/pte_profiles.py); bench/relay_layers.py
measures it (`specrelay bench relay --layer-profile`).

The measurement (RelayCaching, arXiv 2603.13289, its layer-similarity figure): an upstream agent decodes a span
after its own prompt; a downstream prompt quotes it after different instructions. For every layer ℓ and span token
j, compare the relayed K/V (keys re-rotated to the new positions) with what a full prefill of the downstream prompt
computes there:

    dev_V(ℓ, j) = 1 − cos(V_relayed[ℓ, j], V_full[ℓ, j])        (over all kv heads of the token)
    dev_K(ℓ, j) = 1 − cos(K_relayed[ℓ, j], K_full[ℓ, j])

Layer 0 depends on the token and its position only, so its deviation is rounding; deeper layers have seen a
different context. `first_tokens` splits the span: its first tokens lost the context they were decoded in
(EPIC, arXiv 2410.15332: recompute the first tokens of each span), the rest mostly see the span itself.

The band: the engine runs every span token through layers 0 .. c (`check_layers`, the last is c) and only selected
ones past it, so c is the one knob of the "recompute all" band. The rule (`choose_band`): c is the first layer
whose mean value deviation reaches `band_share` of the deepest layers' — the point where reuse has already
lost most of what it will lose — capped so that the band costs at most `max_band_share` of the layers (past that
no TTFT is left to win). The span head: when the first tokens deviate at least `HEAD_FACTOR` times as much as the
rest (mean over layers past the band), they are recomputed in every layer (`recompute_first`, EPIC's rule).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specrelay.shared.cache import cache_dir

log = logging.getLogger(__name__)

FIRST_TOKENS = 16  # EPIC's recomputed span head
BAND_SHARE = 0.5
MAX_BAND_SHARE = 0.2
HEAD_FACTOR = 2.0


@dataclass
class LayerProfile:
    model: str
    num_layers: int
    span_lens: list[int]
    num_prompts: int
    first_tokens: int
    dev_v: list[float]  # [num_layers] mean over span tokens of 1 − cos(V_relayed, V_full)
    dev_k: list[float]
    dev_v_first: list[float]  # ... over each span's first `first_tokens` tokens
    dev_v_rest: list[float]  # ... over the others
    check_layers: list[int] = field(default_factory=list)  # chosen by `choose_band`
    recompute_first: int = 0  # chosen by `choose_head`

    def table(self) -> str:
        lines = [f"per-layer deviation of relayed K/V from full prefill ({self.model}, spans "
                 f"{','.join(map(str, self.span_lens))}, {self.num_prompts} prompts each); band: check layers "
                 f"{','.join(map(str, self.check_layers))}, span head recomputed: {self.recompute_first}",
                 f"  {'layer':>5}{'1-cos V':>10}{'1-cos K':>10}{'V first ' + str(self.first_tokens):>12}"
                 f"{'V rest':>10}"]
        for i in range(self.num_layers):
            mark = "  <- last check layer" if self.check_layers and i == max(self.check_layers) else ""
            lines.append(f"  {i:>5}{self.dev_v[i]:>10.4f}{self.dev_k[i]:>10.4f}{self.dev_v_first[i]:>12.4f}"
                         f"{self.dev_v_rest[i]:>10.4f}{mark}")
        return "\n".join(lines)


def choose_band(dev_v: list[float], band_share: float = BAND_SHARE,
                max_band_share: float = MAX_BAND_SHARE) -> list[int]:
    """Check layers [1, c] (layer 0 never deviates): c = first layer whose deviation reaches band_share of the
    mean of the deepest quarter of layers, at most max_band_share of the model's layers."""
    num_layers = len(dev_v)
    deep = dev_v[-max(1, num_layers // 4):]
    target = band_share * sum(deep) / len(deep)
    cap = max(1, int(max_band_share * num_layers) - 1)
    c = next((i for i, d in enumerate(dev_v) if i >= 1 and d >= target), cap)
    c = max(1, min(c, cap, num_layers - 1))
    return list(range(1, c + 1)) if c > 1 else [1]


def choose_head(profile: LayerProfile, head_factor: float = HEAD_FACTOR) -> int:
    """`first_tokens` if the span heads deviate ≥ head_factor × the rest past the band, else 0."""
    past = max(profile.check_layers, default=0) + 1
    first, rest = profile.dev_v_first[past:], profile.dev_v_rest[past:]
    if not first or sum(rest) <= 0:
        return 0
    return profile.first_tokens if sum(first) >= head_factor * sum(rest) else 0


def band_for(model_id: str) -> tuple[tuple[int, ...], int]:
    """(check layers, recomputed span head) cached for this model, else (layer 1 as CacheBlend, no head), said in
    the log."""
    profile = load(profile_path(model_id))
    if profile is not None and profile.check_layers:
        return tuple(profile.check_layers), profile.recompute_first
    log.warning("relay: no layer profile cached for %s (run `specrelay bench relay --layer-profile --model ...`); "
                "checking at layer 1", model_id)
    return (1,), 0


def profile_path(model_id: str) -> Path:
    """Where the profile of a model (prefix_cache.model_id: config digest, weights size, dtype) is cached."""
    return cache_dir() / "relay" / (re.sub(r"[^A-Za-z0-9_.-]+", "-", model_id) + ".json")


def save(profile: LayerProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(profile), indent=1) + "\n")
    tmp.replace(path)


def load(path: Path) -> LayerProfile | None:
    try:
        return LayerProfile(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
