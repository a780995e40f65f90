"""Formats and packed layers shared by the kernel tests."""

import torch

from ditq.quant.layers import QuantLinear
from ditq.quant.spec import PerChannel, PerColumnGroup, PerGroup, PerTensor, PerToken, QuantSpec

STATIC_ASYM = QuantSpec(8, False)
TOKEN_SYM = QuantSpec(8, True, PerToken(), dynamic=True)
FORMATS = {
    "w8a8 sym/static": (QuantSpec(8, True, PerChannel()), STATIC_ASYM),
    "w8a8 asym/token": (QuantSpec(8, False, PerChannel()), TOKEN_SYM),
    "w8a8 per-tensor/dyn-tensor": (
        QuantSpec(8, False, PerTensor()),
        QuantSpec(8, False, dynamic=True),
    ),
    "w4a8 group": (QuantSpec(4, False, PerGroup(32)), STATIC_ASYM),
    "w4a8 channel": (QuantSpec(4, True, PerChannel()), TOKEN_SYM),
    "w4a8 column-group": (QuantSpec(4, True, PerColumnGroup(8, strided=True)), STATIC_ASYM),
    "w4a16 group": (QuantSpec(4, True, PerGroup(16)), QuantSpec(16)),
    "w3a6": (QuantSpec(3, False, PerChannel()), QuantSpec(6, False)),
    "w4a4 groups (svdquant)": (
        QuantSpec(4, True, PerGroup(32)),
        QuantSpec(4, True, PerGroup(32), dynamic=True),
    ),
    "w4a4 groups, a asym (svdquant --no-a-symmetric)": (
        QuantSpec(4, True, PerGroup(32)),
        QuantSpec(4, False, PerGroup(32), dynamic=True),
    ),
    "w4a8 channel, a asym groups": (
        QuantSpec(4, False, PerChannel()),
        QuantSpec(8, False, PerGroup(32), dynamic=True),
    ),
    "fp8": (
        QuantSpec(8, True, PerChannel(), fmt="fp8_e4m3"),
        QuantSpec(8, True, PerToken(), dynamic=True, fmt="fp8_e4m3"),
    ),
    "fp8 static": (
        QuantSpec(8, True, PerChannel(), fmt="fp8_e4m3"),
        QuantSpec(8, True, fmt="fp8_e4m3"),
    ),
    "w8 int, a fp8": (QuantSpec(8, True, PerChannel()), QuantSpec(8, True, fmt="fp8_e4m3")),
    "w4 int asym, a fp8": (QuantSpec(4, False, PerChannel()), QuantSpec(8, True, fmt="fp8_e4m3")),
    "w4 int sym, a fp8 token": (
        QuantSpec(4, True, PerChannel()),
        QuantSpec(8, True, PerToken(), dynamic=True, fmt="fp8_e4m3"),
    ),
    "fp8, a fp8 groups": (
        QuantSpec(8, True, PerChannel(), fmt="fp8_e4m3"),
        QuantSpec(8, True, PerGroup(32), dynamic=True, fmt="fp8_e4m3"),
    ),
}


def packed_layer(w_spec, a_spec, online_scale=True, rank=4, K=64, N=48, seed=0):
    """A packed QuantLinear (optionally with input_scale and a low-rank branch) and an input."""
    torch.manual_seed(seed)
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N), w_spec, a_spec)
    if online_scale:
        layer.input_scale = torch.rand(K) + 0.5
    if rank:
        layer.set_lowrank(0.1 * torch.randn(N, rank), 0.1 * torch.randn(rank, K))
    layer.calibrate_weight()
    x = 2 * torch.randn(3, 5, K)
    if a_spec.needs_calibration:
        layer.act_quantizer.find_params(x / layer.input_scale if online_scale else x)
    layer.pack()
    return layer.requires_grad_(False), x
