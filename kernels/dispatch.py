"""Kernel or reference: one decision for every kernel in this package.

The Triton kernels run when the tensors live on a CUDA device, or anywhere under the Triton interpreter
(`TRITON_INTERPRET=1`, which is how CI checks them on CPU). Everywhere else the plain-torch references run. The
setting `SPECRELAY_KERNELS=auto|triton|torch` (or `set_kernel_mode`) forces either side; `auto` also falls back to
the reference when triton is missing or has no driver it can launch on.

triton is imported on first use only: importing a kernel module (the engine does so on CPU too) stays free of it.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Literal

import torch

from specrelay.shared.errors import ConfigError

KernelMode = Literal["auto", "triton", "torch"]
KERNEL_MODES: tuple[KernelMode, ...] = ("auto", "triton", "torch")
ENV_KERNELS = "SPECRELAY_KERNELS"

log = logging.getLogger(__name__)
_mode_override: KernelMode | None = None


def set_kernel_mode(mode: KernelMode | None) -> None:
    """Force kernels (`triton`), references (`torch`) or the automatic choice; None returns to the env setting."""
    global _mode_override
    if mode is not None and mode not in KERNEL_MODES:
        raise ConfigError(f"kernel mode must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    _mode_override = mode


def kernel_mode() -> KernelMode:
    if _mode_override is not None:
        return _mode_override
    value = os.environ.get(ENV_KERNELS, "auto").strip().lower() or "auto"
    if value not in KERNEL_MODES:
        raise ConfigError(f"{ENV_KERNELS} must be one of {', '.join(KERNEL_MODES)}, got {value!r}")
    return value  # type: ignore[return-value]


def interpret_enabled() -> bool:
    """The interpreter decides at `@triton.jit` time, so each kernel module builds one kernel set per answer."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _import_triton() -> tuple[ModuleType, ModuleType] | None:
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # ImportError, or a broken install that fails while importing
        log.info("triton unavailable (%s); the torch references will run", e)
        return None
    return triton, tl


def load_triton() -> tuple[ModuleType, ModuleType]:
    """(triton, triton.language); raises ConfigError when triton cannot be imported."""
    mods = _import_triton()
    if mods is None:
        raise ConfigError("triton is not installed (pip install 'specrelay[gpu]'), or it failed to import")
    return mods


@functools.cache
def _cuda_driver_ok() -> bool:
    mods = _import_triton()
    if mods is None:
        return False
    try:
        mods[0].runtime.driver.active.get_current_device()
    except Exception as e:
        log.warning("triton cannot launch on this CUDA device (%s); the torch references will run", e)
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors (they must all be on one kind of device)."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    interpret = interpret_enabled()
    if mode == "triton":
        load_triton()
        if not (on_cuda or interpret):
            raise ConfigError(
                f"{ENV_KERNELS}=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on CPU"
            )
        return True
    if interpret:
        return _import_triton() is not None
    return on_cuda and _cuda_driver_ok()


def runtime_uses_triton(*tensors: torch.Tensor) -> bool:
    """The model runtime's choice (attention, KV compaction): kernels on CUDA, references elsewhere.

    Unlike `use_triton`, `auto` never picks the interpreter: a CPU forward under TRITON_INTERPRET=1 would run
    each kernel in Python. `SPECRELAY_KERNELS=triton` still forces the kernels (with the interpreter on CPU),
    which is how the CPU tests check that the runtime's kernel path gives the same output as the torch path."""
    if kernel_mode() == "auto":
        return all(t.is_cuda for t in tensors) and _cuda_driver_ok()
    return use_triton(*tensors)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
