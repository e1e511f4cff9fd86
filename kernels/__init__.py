"""Triton kernels for the verifier and the drafter, each beside its launcher and a plain-torch reference.

The public entry points pick the kernel or the reference (see `dispatch`); they are loaded on first access so
that importing `specrelay.kernels` (the CLI does, for `specrelay kernels`) stays free of torch and triton.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tree_attention": "specrelay.kernels.tree_attention",
    "spec_accept": "specrelay.kernels.spec_accept",
    "SpecAcceptResult": "specrelay.kernels.spec_accept",
    "rope_shift_": "specrelay.kernels.rope_shift",
    "kv_compact_": "specrelay.kernels.kv_compact",
    "set_kernel_mode": "specrelay.kernels.dispatch",
    "use_triton": "specrelay.kernels.dispatch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'specrelay.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
