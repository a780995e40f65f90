"""rtn, smoothquant and single-step on a tiny DiT: exactness at 16 bits, sensible error at
8 and 4 bits, and each method's defining behaviour."""

import pytest
import torch

from ditq.errors import DitqError
from ditq.methods import METHODS, SingleStepConfig, SmoothQuantConfig
from ditq.pipeline.steps import quantized_layers

from conftest import output_error, run_unpacked, tiny_dit


@pytest.mark.parametrize("name", list(METHODS))
def test_w16a16_is_exact_and_w8a8_is_close(name, calib):
    method = METHODS[name]
    kwargs = {
        "single-step": {"w_group_size": 16},
        "ptq4dit": {"attn_bits": 16, "recon_iters": 0},  # W16A16: attention in float too
        "gptq": {"w_group_size": 16},
        "svdquant": {"w_group_size": 16, "a_group_size": 16, "lowrank_rank": 4},
    }.get(name, {})
    exact = tiny_dit()
    run_unpacked(method, exact, method.config_class(wbits=16, abits=16, **kwargs), calib)
    assert output_error(exact, tiny_dit()) < 1e-5
    model = tiny_dit()
    run_unpacked(method, model, method.config_class(wbits=8, abits=8, **kwargs), calib)
    assert 0 < output_error(model, tiny_dit()) < 0.05
    # the block linears; PTQ4DiT's official coverage adds the adaLN, embedder and final linears
    assert len(quantized_layers(model)) == (15 if name == "ptq4dit" else 8)


def test_smoothquant_reduces_activation_outliers(calib):
    model = tiny_dit()
    # plant an outlier channel in the qkv input of block 0 through the adaLN shift
    with torch.no_grad():
        model.blocks[0].adaLN_modulation[1].bias[5] = 400.0
    reference = tiny_dit()
    reference.load_state_dict(model.state_dict())
    plain = tiny_dit()
    plain.load_state_dict(model.state_dict())
    run_unpacked(METHODS["rtn"], plain, METHODS["rtn"].config_class(wbits=8, abits=8), calib)
    smooth = SmoothQuantConfig(wbits=8, abits=8, alpha=0.5)
    report = run_unpacked(METHODS["smoothquant"], model, smooth, calib)
    assert report["smoothing_factors"]["blocks.0.attn.qkv"]["max"] > 2
    assert output_error(model, reference) < 0.5 * output_error(plain, reference)


def test_single_step_defaults_and_first_step_calibration(calib):
    config = SingleStepConfig(wbits=4, abits=8, w_group_size=16)
    assert config.w_granularity == "group"
    first = calib.subset([0])
    assert first.timesteps() == [999]
    report = run_unpacked(METHODS["single-step"], tiny_dit(), config, first)
    assert report["calibrated_timesteps"] == [999]
    assert METHODS["single-step"].default_calib.steps == "first"


def test_smoothquant_alpha_is_validated():
    with pytest.raises(DitqError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
