"""Walsh–Hadamard rotations against explicit Sylvester Hadamard matrices (float64), and
rotated layers that compute the float function unchanged."""

import math

import numpy as np
import pytest
import torch

from ditq.quant.hadamard import hadamard_block, random_signs, rotate
from ditq.quant.layers import QuantLinear
from ditq.quant.quantizer import Quantizer
from ditq.quant.spec import PerGroup, QuantSpec

FLOAT = QuantSpec(bits=16)


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@pytest.mark.parametrize("width", [8, 64, 384, 96])
def test_rotation_is_signs_then_block_diagonal_hadamard(width):
    block = hadamard_block(width)
    assert block == max(2**k for k in range(12) if width % 2**k == 0)
    signs = random_signs(width, 7).double()
    x = torch.randn(5, 3, width, dtype=torch.float64)
    explicit = torch.block_diag(*[sylvester(block)] * (width // block)) / math.sqrt(block)
    torch.testing.assert_close(rotate(x, signs), (x * signs) @ explicit)
    r = rotate(torch.eye(width, dtype=torch.float64), signs)
    torch.testing.assert_close(r @ r.T, torch.eye(width, dtype=torch.float64))


def test_a_rotated_float_layer_computes_the_same_function():
    linear = torch.nn.Linear(96, 10).double()
    layer = QuantLinear.from_linear(linear, FLOAT, FLOAT).double()
    layer.input_scale = torch.rand(96, dtype=torch.float64) + 0.5
    layer.set_lowrank(torch.randn(10, 3), torch.randn(3, 96))
    x = torch.randn(7, 96, dtype=torch.float64)
    before = layer(x)
    layer.set_rotation(random_signs(96, 1))
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)  # fp32 branch factors
    assert "online Hadamard rotation" in repr(layer)


def test_per_group_activation_quantizer_matches_numpy():
    """Dynamic: a range per token and group of 8 channels; static: per group over tokens."""
    x = torch.randn(6, 32) * torch.linspace(0.1, 5, 32)
    dynamic = Quantizer(QuantSpec(bits=4, granularity=PerGroup(8), dynamic=True))
    groups = x.numpy().reshape(6, 4, 8).astype(np.float64)
    lo, hi = (
        np.minimum(groups.min(-1, keepdims=True), 0),
        np.maximum(groups.max(-1, keepdims=True), 0),
    )
    step = np.maximum((hi - lo) / 15, 1e-8)
    zero = np.round(-lo / step)
    expected = (np.clip(np.round(groups / step) + zero, 0, 15) - zero) * step
    np.testing.assert_allclose(dynamic(x).numpy(), expected.reshape(6, 32), rtol=1e-5, atol=1e-6)
    static = Quantizer(QuantSpec(bits=4, granularity=PerGroup(8)))
    columns = x.numpy().reshape(6, 4, 8).transpose(1, 0, 2).reshape(4, -1).astype(np.float64)
    lo, hi = np.minimum(columns.min(-1), 0)[:, None], np.maximum(columns.max(-1), 0)[:, None]
    static.set_range(torch.tensor(lo), torch.tensor(hi))
    step = np.maximum((hi - lo) / 15, 1e-8)
    zero = np.round(-lo / step)
    expected = (np.clip(np.round(groups / step) + zero, 0, 15) - zero) * step
    np.testing.assert_allclose(static(x).numpy(), expected.reshape(6, 32), rtol=1e-5, atol=1e-6)
