"""Issue 18's building blocks on a tiny DiT: GPTQ as a solver of any method, Hadamard
rotations, SVDQuant's layer computed by hand, and the CLI round trip of each."""

import pytest
import torch

from ditq.cli import main
from ditq.errors import DitqError
from ditq.methods import METHODS
from ditq.methods.svdquant import SVDQuantConfig
from ditq.pipeline.steps import quantized_layers
from ditq.quant.quantizer import Quantizer

from conftest import output_error, run_unpacked, tiny_dit

GROUPS = {"w_group_size": 16, "a_group_size": 16}


def error(model):
    return output_error(model, tiny_dit())


def quantized(name, calib, **kwargs):
    method, model = METHODS[name], tiny_dit()
    report = run_unpacked(method, model, method.config_class(**kwargs), calib)
    return model, report


@pytest.mark.parametrize("name", ["rtn", "smoothquant", "ditas"])
def test_gptq_as_weight_solver_beats_rounding_to_nearest(name, calib):
    extra = {"w_granularity": "channel"} if name == "ditas" else {}
    plain, _ = quantized(name, calib, wbits=3, abits=8, **extra)
    solved, report = quantized(name, calib, wbits=3, abits=8, weight_solver="gptq", **extra)
    assert report["reconstruction"]["solver"] == "gptq"
    layers = [e for u in report["reconstruction"]["units"].values() for e in u["layers"].values()]
    assert len(layers) == 8 and all(
        e["relative_sq_error"] < e["rtn_relative_sq_error"] for e in layers
    )
    assert error(solved) < error(plain)


def test_rotation_is_exact_in_float_and_helps_4bit_activations(calib):
    exact, report = quantized("rtn", calib, wbits=16, abits=16, rotate=True)
    assert report["rotation"]["layers"] == 8
    assert all(q.rotation_signs is not None for q in quantized_layers(exact).values())
    assert error(exact) < 1e-5
    rotated, _ = quantized("rtn", calib, wbits=8, abits=8, rotate=True)
    assert error(rotated) < 0.05


def test_svdquant_layer_is_the_low_rank_branch_plus_the_quantized_residual(calib):
    model, report = quantized("svdquant", calib, lowrank_rank=4, **GROUPS)
    assert set(report["lowrank_rank"].values()) == {4}
    layer = quantized_layers(model)["blocks.0.mlp.fc2"]  # fc2: smoothed online
    x = torch.randn(5, layer.in_features)
    x_hat = x / layer.input_scale
    act = Quantizer(layer.act_quantizer.spec)
    by_hand = act(x_hat) @ layer.quantized_weight().T + layer.bias
    by_hand = by_hand + x_hat @ (layer.lowrank_up @ layer.lowrank_down).T
    torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-5)
    exact, _ = quantized("svdquant", calib, wbits=16, abits=16, lowrank_rank=4, **GROUPS)
    assert error(exact) < 1e-5
    assert error(model) < error(quantized("rtn", calib, wbits=4, abits=4)[0])


def test_bad_combinations_are_one_clear_error():
    with pytest.raises(DitqError, match="--recon-iters 0"):
        METHODS["ptq4dit"].config_class(weight_solver="gptq")
    with pytest.raises(DitqError, match="weight solver"):
        METHODS["rtn"].config_class(weight_solver="adaround")
    with pytest.raises(DitqError, match="min/max"):
        SVDQuantConfig(a_dynamic=False, a_range="mse")


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "gptq", "--w-group-size", "16"],
        ["--method", "svdquant", "--w-group-size", "16", "--a-group-size", "16", "--rotate"],
        ["--method", "rtn", "--weight-solver", "gptq", "--rotate", "--wbits", "4"],
    ],
    ids=["gptq", "svdquant-rotate", "rtn-gptq-rotate"],
)
def test_each_saves_loads_and_samples_through_the_cli(flags, model_args, tmp_path):
    calib = [
        "--calib-preset",
        "cpu",
        "--calib-samples",
        "2",
        "--calib-num-steps",
        "4",
        "--calib-steps",
        "all",
    ]
    out = tmp_path / "q"
    assert main(["quantize", *model_args, *flags, *calib, "--quiet", "--out", str(out)]) == 0
    sample = ["--num-samples", "2", "--steps", "2", "--sampler", "ddim", "--quiet"]
    assert main(["sample", "--model", str(out), *sample, "--out", str(tmp_path / "s.npz")]) == 0
    assert (tmp_path / "s.npz").is_file()
