"""Which side runs: the kernels under the interpreter or on CUDA, the references elsewhere, and the setting."""

from __future__ import annotations

import pytest
import torch

from specrelay.kernels.dispatch import kernel_mode, set_kernel_mode, use_triton
from specrelay.shared.errors import ConfigError


def test_auto_follows_the_interpreter(monkeypatch):
    x = torch.zeros(2)
    assert use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(x)  # CPU tensors, no interpreter: the reference


def test_setting_forces_either_side(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("SPECRELAY_KERNELS", "torch")
    assert kernel_mode() == "torch" and not use_triton(x)
    set_kernel_mode("triton")  # the setting wins over the environment
    assert use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        use_triton(x)
    set_kernel_mode(None)
    assert kernel_mode() == "torch"


def test_bad_setting_is_a_user_error(monkeypatch):
    monkeypatch.setenv("SPECRELAY_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="SPECRELAY_KERNELS must be one of auto, triton, torch"):
        use_triton(torch.zeros(1))
    with pytest.raises(ConfigError):
        set_kernel_mode("fast")  # type: ignore[arg-type]
