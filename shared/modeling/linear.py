"""Linear layers whose weights MKL packs once, on CPU in float32.

A decode step multiplies a few rows by every weight of the model. MKL's sgemm packs the weight matrix into its
kernel layout on every call; at a few rows that repacking costs several times the multiply itself (it reads and
writes the whole weight once more per call). `torch.ops.mkl._mkl_linear` runs on a weight packed once
(`_mkl_reorder_linear_weight`, cblas_sgemm_pack) - PyTorch's own path for frozen fp32 linears under torch.compile -
and gives the same sums as F.linear (tests/shared/modeling/test_linear.py). Anything else (CUDA, half precision,
training, a torch built without MKL) takes F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 16  # the row count MKL is told to pack for: decode batches; any row count runs on the same pack


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinear(nn.Linear):
    """nn.Linear whose CPU fp32 forward runs on an MKL-packed copy of its weight, repacked whenever the weight
    changes (a load, a copy_: its version counter moves). The packed copy is as large as the weight."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (not _MKL or w.device.type != "cpu" or w.dtype != torch.float32 or x.dtype != torch.float32
                or (torch.is_grad_enabled() and w.requires_grad)):  # the packed op has no backward
            return F.linear(x, w, self.bias)
        key = (w.data_ptr(), w._version)
        if key != self._packed_key:
            with torch.no_grad():
                self._packed = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), PACK_ROWS)
            self._packed_key = key
        return torch.ops.mkl._mkl_linear(x, self._packed, w, self.bias, PACK_ROWS)


_MKL = mkl_packing_available()
