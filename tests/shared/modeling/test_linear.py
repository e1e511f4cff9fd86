"""PackedLinear: the same outputs as nn.Linear at every row count, and a weight change is never served stale."""

import pytest
import torch
import torch.nn.functional as F

from specrelay.shared.modeling.linear import PackedLinear


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_at_any_row_count(bias):
    torch.manual_seed(0)
    layer = PackedLinear(96, 200, bias=bias)
    for rows in (1, 2, 3, 8, 16, 17, 64, 300):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_a_changed_weight_is_repacked():
    torch.manual_seed(1)
    layer = PackedLinear(32, 48, bias=False)
    x = torch.randn(4, 32)
    before = layer(x)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 32))  # a load writes in place: same storage, new version
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    assert not torch.allclose(layer(x), before)


def test_other_dtypes_take_f_linear():
    layer = PackedLinear(16, 8).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_training_gets_gradients():
    layer = PackedLinear(16, 8)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
