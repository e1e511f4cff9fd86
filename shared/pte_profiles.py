"""The PTE profile a verifier prices with, and where `specrelay calibrate` caches it (services/calibrate.py measures
it; shared/pte.py defines it).

Which profile a verifier uses (`find_profile`), first match wins, and `usage.pte.source` says which:
  1. `--pte-profile FILE`                                             source "file"
  2. the profile `specrelay calibrate` cached for this model and device: source "calibrated"
     $SPECRELAY_CACHE_DIR (default ~/.cache/specrelay)/pte/<model-name>-<config-digest>-<device>.json
  3. the paper's analytic γ from the model's shape with H100 figures     source "analytic"
     (β = 0; γ = 2·n_layers·d_model·(H_kv/H_q)·HOI / N_params, HOI = 756.5 FLOP/B; p = 2·N_params / 1,513 TFLOP/s)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from specrelay.shared.cache import cache_dir
from specrelay.shared.errors import ConfigError
from specrelay.shared.pte import H100_PAPER_HOI_FLOP_PER_BYTE, PteProfile, analytic_gamma

H100_PAPER_PEAK_FLOPS = 1513e12  # the paper's FP16-with-sparsity peak, the compute side of its HOI


def profile_path(model_dir: str | Path, device: str) -> Path:
    """Where `calibrate` caches the profile of this model on this device (the config digest tells apart two
    models in directories of the same name)."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    digest = hashlib.blake2b(config.read_bytes(), digest_size=6).hexdigest() if config.is_file() else "noconfig"
    return cache_dir() / "pte" / f"{model_dir.resolve().name}-{digest}-{device.replace(':', '')}.json"


def analytic_profile(model, name: str = "unknown") -> PteProfile:
    """The paper's profile from the model's shape (no measurement): the documented fallback."""
    cfg = model.config
    num_params = float(sum(p.numel() for p in model.parameters()))
    gamma = analytic_gamma(cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.num_heads, num_params,
                           H100_PAPER_HOI_FLOP_PER_BYTE)
    return PteProfile.analytic(gamma, num_params, H100_PAPER_PEAK_FLOPS, device="h100-paper", model=name)


def find_profile(path: str | None, model_dir: str | Path | None, device: str, model) -> tuple[PteProfile, str]:
    """(profile, source) by the order in the module docstring. An explicit file that cannot be read is an error;
    a cached one that cannot be read is skipped."""
    if path:
        return PteProfile.load(path), "file"
    if model_dir:
        cached = profile_path(model_dir, device)
        if cached.is_file():
            try:
                return PteProfile.load(cached), "calibrated"
            except ConfigError:
                pass
    return analytic_profile(model, Path(model_dir).name if model_dir else "unknown"), "analytic"
