"""PTQ4DiT on a tiny DiT (METHODS.md "PTQ4DiT"): Spearman's ρ against scipy, the SSC weights,
the exactness of the folded FP model, CSB's geometric-mean channel maxima against a float64
reference, per-sample SSC against captured inputs, quantization error, the planted salient
channel case, configuration errors, and the CLI."""

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from ditq.calib.dataset import build_calibration_set
from ditq.calib.hooks import capture_inputs
from ditq.calib.stats import spearman_rho
from ditq.cli import main
from ditq.diffusion.pipeline import SamplingSettings
from ditq.errors import DitqError
from ditq.methods import METHODS, PTQ4DiTConfig
from ditq.methods.ptq4dit import (
    calibrated_salience,
    csb_timestep,
    salience_rows,
    ssc_weights,
)
from ditq.pipeline.adaround_solver import AdaRoundSolver, ReconSettings
from ditq.pipeline.config import LayerSelection
from ditq.pipeline.steps import activation_quantizers, quantized_layers
from ditq.quant.spec import PerChannel, PerTensor

from conftest import run_unpacked, tiny_dit

FLOAT = {"wbits": 16, "abits": 16, "attn_bits": 16, "recon_iters": 0}
MODES = [("none", False), ("csb", False), ("csb+ssc", False), ("csb+ssc", True)]


def _run(model, calib, **settings):
    """PTQ4DiT without reconstruction on the block linears (``--layers blocks``) unless
    ``settings`` say otherwise."""
    config = PTQ4DiTConfig(**{"recon_iters": 0, "layers": LayerSelection(), **settings})
    return run_unpacked(METHODS["ptq4dit"], model, config, calib)


def _error(model, reference, seed=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    y = torch.randint(0, 5, (6,), generator=g)  # includes the null class 4
    with torch.no_grad():
        out, ref = model(x, t, y), reference(x, t, y)
    return ((out - ref).norm() / ref.norm()).item()


# --- Spearman's rho and the SSC weights --------------------------------------------------


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_spearman_matches_scipy_with_and_without_ties():
    g = torch.Generator().manual_seed(0)
    for n in (2, 7, 200):
        for a, b in [
            (torch.randn(n, generator=g), torch.randn(n, generator=g)),
            (torch.randint(0, 4, (n,), generator=g).float(), torch.randn(n, generator=g)),
            (
                torch.randint(0, 3, (n,), generator=g).float(),
                torch.randint(0, 3, (n,), generator=g),
            ),
        ]:
            expected = scipy.stats.spearmanr(a.numpy(), b.numpy()).statistic
            if np.isnan(expected):
                assert math.isnan(spearman_rho(a, b))
            else:
                assert spearman_rho(a, b) == pytest.approx(expected, abs=1e-12)


def test_spearman_hand_computed_cases():
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: centred dot 4.5, norms sqrt(4.5) and sqrt(5)
    a, b = torch.tensor([1.0, 2.0, 2.0, 4.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])
    assert spearman_rho(a, b) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    x = torch.tensor([0.1, 5.0, 2.0, 3.0])
    assert spearman_rho(x, x.exp()) == pytest.approx(1.0)  # monotone, not linear
    assert spearman_rho(x, -(x**3)) == pytest.approx(-1.0)
    assert math.isnan(spearman_rho(torch.ones(4), x))
    with pytest.raises(DitqError, match="same length"):
        spearman_rho(torch.ones(3), torch.ones(4))


def test_ssc_weights_are_a_softmax_favouring_less_correlated_rows():
    rho = torch.tensor([1.0, -1.0, 0.2])
    eta = ssc_weights(rho)
    expected = torch.exp(-rho.double()) / torch.exp(-rho.double()).sum()
    torch.testing.assert_close(eta, expected)
    assert eta.sum().item() == pytest.approx(1.0) and eta[1] > eta[2] > eta[0]
    torch.testing.assert_close(
        ssc_weights(torch.tensor([float("nan"), 0.0])), torch.full((2,), 0.5, dtype=torch.float64)
    )


def test_calibrated_salience_weighs_timesteps_by_their_spearman_rho():
    g = torch.Generator().manual_seed(3)
    s_w = torch.rand(16, generator=g) + 0.1
    order = s_w.argsort()
    same = torch.empty(16).scatter_(0, order, torch.arange(1.0, 17.0))  # rho = +1
    reverse = torch.empty(16).scatter_(0, order, torch.arange(16.0, 0.0, -1.0))  # rho = -1
    noisy = torch.rand(16, generator=g) * 10
    rows = torch.stack([same, reverse, noisy])
    s_rho, rho, eta = calibrated_salience(rows, s_w)
    assert rho[:2].tolist() == pytest.approx([1.0, -1.0])
    assert eta.sum().item() == pytest.approx(1.0)
    assert eta[1] > eta[2] > eta[0]  # the anti-correlated timestep weighs most
    expected = sum(math.exp(-r) * row.double() for r, row in zip(rho.tolist(), rows, strict=True))
    torch.testing.assert_close(s_rho.double(), expected / sum(math.exp(-r) for r in rho.tolist()))


def test_csb_uses_the_median_calibration_timestep(calib):
    assert csb_timestep([999, 799, 599, 400, 200, 0]) == 400
    assert csb_timestep([0, 500, 250]) == 250
    assert _run(tiny_dit(), calib, balance="csb", **FLOAT)["timesteps"] == [400]


# --- exactness of the offline re-parameterization, CSB's geometric mean -------------------


@pytest.mark.parametrize("balance, per_sample", MODES)
def test_folded_float_model_equals_the_original(calib, balance, per_sample):
    model = tiny_dit()
    report = _run(model, calib, balance=balance, ssc_per_sample=per_sample, **FLOAT)
    assert _error(model, tiny_dit()) < 1e-5
    assert len(report["balanced_layers"]) == (0 if balance == "none" else 6)
    if balance != "none":
        factors = report["balanced_layers"]["blocks.1.mlp.fc1"]["factor"]
        assert factors["max"] > factors["min"] > 0  # something was actually balanced


def test_csb_gives_activation_and_weight_the_geometric_mean_channel_maxima(calib):
    """sqrt(s(X_j) s(W_j)) computed in float64 from the untouched FP model's inputs at the
    CSB timestep; qkv's s(W) includes proj's factor folded into its V rows."""
    step = int(calib.step[calib.t == 400][0])
    at_t = calib.subset([step])
    fp = tiny_dit()
    model = tiny_dit()
    _run(model, calib, balance="csb", **FLOAT)

    def s_x(net, name):
        return capture_inputs(net, at_t, name, progress=False).double().abs().amax(0)

    for i in range(2):
        block = f"blocks.{i}"
        w = {
            name: fp.get_submodule(f"{block}.{name}").weight.double()
            for name in ("attn.qkv", "attn.proj", "mlp.fc1")
        }
        sx = {name: s_x(fp, f"{block}.{name}") for name in w}
        s_proj = (sx["attn.proj"] / w["attn.proj"].abs().amax(0)).sqrt()
        w["attn.qkv"][64:] /= s_proj[:, None]  # proj's factor lives in the V rows
        for name, weight in w.items():
            expected = (sx[name] * weight.abs().amax(0)).sqrt()
            balanced_x = s_x(model, f"{block}.{name}")
            balanced_w = model.get_submodule(f"{block}.{name}").weight.double().abs().amax(0)
            torch.testing.assert_close(balanced_x, expected, rtol=1e-4, atol=0)
            torch.testing.assert_close(balanced_w, expected, rtol=1e-4, atol=0)


def test_per_sample_ssc_has_one_salience_row_per_calibration_entry(calib):
    model = tiny_dit()
    names = ["blocks.0.attn.qkv", "blocks.1.attn.proj"]
    config = PTQ4DiTConfig(ssc_per_sample=True, recon_iters=0)
    rows, timesteps = salience_rows(
        model, calib, names, config, batch_size=5, device="cpu", progress=False
    )
    assert timesteps == calib.t.tolist()  # built sets are stored in sampling order
    for name in names:
        x = capture_inputs(model, calib, name, progress=False)
        expected = x.reshape(len(calib), -1, x.shape[-1]).abs().amax(1)
        torch.testing.assert_close(rows[name], expected)


# --- quantization --------------------------------------------------------------------------


def test_defaults_are_the_official_settings():
    config = PTQ4DiTConfig()
    weight, act, attention = config.weight_spec(), config.act_spec(), config.attention_spec()
    assert isinstance(weight.granularity, PerChannel) and not weight.symmetric
    assert weight.range_method == act.range_method == "percentile_search"
    assert isinstance(act.granularity, PerTensor) and not act.symmetric and not act.dynamic
    assert attention.bits == 8 and config.balance == "csb+ssc" and not config.ssc_per_sample
    assert (config.recon_iters, config.recon_batch_size) == (20000, 32)
    assert (config.recon_weight_lr, config.recon_act_lr) == (1e-3, 4e-5)
    assert config.recon_chunks == 10
    assert config.recon_tf32  # the official script allows TF32
    assert METHODS["ptq4dit"].solver(config).settings.tf32
    assert not METHODS["ptq4dit"].solver(PTQ4DiTConfig(recon_tf32=False)).settings.tf32
    assert config.layers == LayerSelection(
        blocks=True, embedders=True, adaln=True, final_layer=True
    )
    calib = METHODS["ptq4dit"].default_calib
    assert (calib.num_samples, calib.steps, calib.sampler) == (32, list(range(0, 250, 10)), "ddpm")
    assert (calib.num_steps, calib.cfg_scale) == (250, 1.5)
    assert calib.steps[-1] == 240 and len(calib.steps) == 25
    official = [c for c in range(16) for _ in range(2)]  # classes 0..15, two images each
    assert calib.resolve_classes(1000) == official
    assert calib.resolve_classes(10) == [c for c in range(10) for _ in range(2)]  # then cycled


def test_default_coverage_is_every_linear_and_the_patch_convolution(calib):
    """The official QuantModel wraps every nn.Linear and nn.Conv2d: enumerated here from the
    official state-dict layout (every 2-d or 4-d weight but the class embedding table)."""
    fp = tiny_dit()
    official = sorted(
        key.removesuffix(".weight")
        for key, value in fp.state_dict().items()
        if key.endswith(".weight") and value.dim() in (2, 4) and "embedding_table" not in key
    )
    assert "x_embedder.proj" in official and fp.state_dict()["x_embedder.proj.weight"].dim() == 4
    model = tiny_dit()
    run_unpacked(METHODS["ptq4dit"], model, PTQ4DiTConfig(recon_iters=0), calib)
    assert sorted(quantized_layers(model)) == official
    assert 0 < _error(model, tiny_dit()) < 0.05


@pytest.mark.parametrize("wbits, bound", [(8, 0.01), (4, 0.05)])
def test_w8a8_and_w4a8_stay_close_to_fp(calib, wbits, bound):
    model = tiny_dit()
    report = _run(model, calib, wbits=wbits, abits=8)
    assert 0 < _error(model, tiny_dit()) < bound
    assert len(quantized_layers(model)) == 8
    attention = [n for n in activation_quantizers(model) if n.endswith(("q_act", "attn_act"))]
    assert len(attention) == 4 and all(
        r["max"] > r["min"] for r in report["activation_ranges"].values()
    )
    rho = report["balanced_layers"]["blocks.0.attn.qkv"]["rho"]
    assert len(rho) == len(calib.timesteps()) == len(report["timesteps"])


def _planted(seed):
    """A DiT whose qkv and fc1 inputs carry one salient channel (a large adaLN shift) that
    meets a small weight column: the complementary salience CSB redistributes."""
    model = tiny_dit(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[1].bias[5] = 40.0  # shift_msa: qkv input channel 5
            block.adaLN_modulation[1].bias[3 * 32 + 7] = 40.0  # shift_mlp: fc1 input channel 7
            block.attn.qkv.weight[:, 5] *= 0.1
            block.mlp.fc1.weight[:, 7] *= 0.1
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balancing_a_planted_salient_channel_lowers_w4a8_error(seed):
    reference = _planted(seed)
    settings = SamplingSettings(sampler="ddim", steps=6, cfg_scale=1.5, seed=11)
    calib = build_calibration_set(reference, 4, settings, steps="all", progress=False)
    errors = {}
    for balance in ("none", "csb+ssc"):
        model = _planted(seed)
        _run(model, calib, wbits=4, abits=8, balance=balance)
        errors[balance] = _error(model, reference)
    assert errors["csb+ssc"] < 0.5 * errors["none"]


def test_reconstruction_gets_the_untouched_fp_model_and_the_settings(calib, monkeypatch):
    seen = {}

    def run_sequential(qmodel, fp_model, calib_set, solver, *, device, batch_size, progress, **_):
        seen["fp_error"] = _error(fp_model, tiny_dit())
        seen["layers"] = len(quantized_layers(qmodel)), len(quantized_layers(fp_model))
        seen["solver"] = solver
        return {"units": {}}

    monkeypatch.setattr("ditq.pipeline.run.run_sequential", run_sequential)
    config = {"recon_iters": 7, "recon_batch_size": 3, "recon_weight_lr": 0.5, "recon_act_lr": 0.25}
    report = _run(tiny_dit(), calib, **config)
    assert report["reconstruction"] == {"units": {}}
    assert seen["fp_error"] == 0 and seen["layers"] == (8, 0)
    assert isinstance(seen["solver"], AdaRoundSolver)
    expected = ReconSettings(iters=7, batch_size=3, weight_lr=0.5, act_lr=0.25, chunks=10)
    assert seen["solver"].settings == expected


def test_reconstruction_runs_end_to_end(calib):
    model = tiny_dit()
    report = _run(model, calib, wbits=4, abits=8, recon_iters=5, recon_batch_size=4)
    assert report["reconstruction"]["settings"]["iters"] == 5
    assert report["reconstruction"]["units"]
    assert 0 < _error(model, tiny_dit()) < 0.05
    assert not any(layer.packed for layer in quantized_layers(model).values())


def test_reconstruction_with_the_official_coverage_has_official_units(calib):
    """Blocks (each with its adaLN linear), then the linears outside the blocks one by one."""
    model = tiny_dit()
    config = PTQ4DiTConfig(wbits=4, abits=8, recon_iters=4, recon_batch_size=4, recon_chunks=2)
    report = run_unpacked(METHODS["ptq4dit"], model, config, calib)
    units = list(report["reconstruction"]["units"])
    assert units == [
        "x_embedder.proj",
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "blocks.0",
        "blocks.1",
        "final_layer.adaLN_modulation.1",
        "final_layer.linear",
    ]
    assert report["reconstruction"]["units"]["blocks.0"]["rounding_layers"] == 5  # adaLN too
    assert 0 < _error(model, tiny_dit()) < 0.1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"balance": "ssc"}, "--balance 'ssc'"),
        ({"balance": "csb", "ssc_per_sample": True}, "--ssc-per-sample"),
        ({"recon_iters": -1}, "--recon-iters"),
        ({"recon_batch_size": 0}, "--recon-batch-size"),
        ({"recon_act_lr": 0.0}, "--recon-act-lr"),
        ({"recon_chunks": 0}, "--recon-chunks"),
    ],
)
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(DitqError, match=message.replace("+", r"\+")):
        PTQ4DiTConfig(**settings)


def test_calibration_set_is_required():
    with pytest.raises(DitqError, match="calibrat"):
        _run(tiny_dit(), None)


# --- registry and CLI ----------------------------------------------------------------------


def test_registered_with_its_cli_flags(capsys):
    assert METHODS["ptq4dit"].config_class is PTQ4DiTConfig
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--balance", "--ssc-per-sample", "--recon-iters", "--recon-batch-size"):
        assert flag in help_text


def test_cli_quantize_then_sample(tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_dit().state_dict(), checkpoint)
    out, samples = tmp_path / "q", tmp_path / "s.npz"
    tiny = ["--vae", "none", "--device", "cpu", "--quiet"]
    calib = ["--calib-samples", "2", "--calib-sampler", "ddim", "--calib-num-steps", "4"]
    quantize = ["quantize", "--model", str(checkpoint), "--num-heads", "2", "--out", str(out)]
    method = ["--method", "ptq4dit", "--wbits", "8", "--abits", "8", "--recon-iters", "0"]
    args = [*quantize, *method, "--balance", "csb+ssc", *calib, "--calib-steps", "2", *tiny]
    assert main(args) == 0
    assert "ptq4dit W8A8" in capsys.readouterr().out
    manifest = json.loads((out / "ditq.json").read_text())
    assert manifest["method"] == "ptq4dit" and manifest["method_config"]["recon_iters"] == 0
    report = json.loads((out / "calibration_report.json").read_text())
    assert len(report["method"]["balanced_layers"]) == 6 and report["method"]["timesteps"]
    sample = ["sample", "--model", str(out), "--sampler", "ddim", "--steps", "3"]
    assert main([*sample, "--num-samples", "2", "--out", str(samples), *tiny]) == 0
    assert np.load(samples)["arr_0"].shape == (2, 8, 8, 3)
