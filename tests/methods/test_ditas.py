"""DiTAS on tiny DiTs: exact folding (low-rank branch included), the α search against a
float64 brute force, W4A8 better than RTN with an outlier channel, settings and the CLI."""

import json

import numpy as np
import pytest
import torch

import ditq.methods.ditas as ditas_module
from ditq.calib.dataset import build_calibration_set
from ditq.calib.hooks import capture_inputs
from ditq.cli import main
from ditq.diffusion.pipeline import SamplingSettings
from ditq.errors import DitqError
from ditq.methods import METHODS, DiTASConfig, RTNConfig
from ditq.methods.ditas import ALPHA_GRID, _SearchInputs
from ditq.pipeline.steps import quantized_layers

from conftest import run_unpacked, save_checkpoint, tiny_dit

HIDDEN = 32
QKV_INPUT_OUTLIER, FC1_INPUT_OUTLIER = 5, 7


def outlier_dit():
    """tiny_dit with one large input channel of qkv and of fc1 in block 0 (through the adaLN
    shift chunks), the activation outliers smoothing is for."""
    model = tiny_dit()
    with torch.no_grad():
        bias = model.blocks[0].adaLN_modulation[1].bias
        bias[QKV_INPUT_OUTLIER] = 40.0  # shift_msa
        bias[3 * HIDDEN + FC1_INPUT_OUTLIER] = 30.0  # shift_mlp
    return model


@pytest.fixture(scope="module")
def calib():
    settings = SamplingSettings(sampler="ddim", steps=4, cfg_scale=1.5, seed=3)
    return build_calibration_set(outlier_dit(), 4, settings, steps="all", progress=False)


def _inputs():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 3, 8, 8, generator=g)
    return x, torch.randint(0, 1000, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)


def _error(model, reference):
    x, t, y = _inputs()
    with torch.no_grad():
        out, ref = model(x, t, y), reference(x, t, y)
    return ((out - ref).norm() / ref.norm()).item()


def _run(config, calib, model=None):
    model = outlier_dit() if model is None else model
    report = run_unpacked(METHODS["ditas"], model, config, calib)
    return model, report


@pytest.mark.parametrize("rank", [0, 8])
def test_w16a16_is_exact_with_and_without_the_lowrank_branch(calib, rank):
    model, report = _run(DiTASConfig(wbits=16, abits=16, lowrank_rank=rank), calib)
    assert _error(model, outlier_dit()) < 1e-5
    assert len(report["layers"]) == 8 and all(
        layer.lowrank_rank == rank for layer in quantized_layers(model).values()
    )


@pytest.mark.parametrize("fold_proj", [False, True])
def test_folding_carries_a_nonzero_lowrank_branch_exactly(calib, monkeypatch, fold_proj):
    """At 16 bits the real branch is zero, so plant random ones: the layers hold W − L R plus
    the branch, smoothing scales R's columns, and proj's factors either divide qkv's L V rows
    (``fold_proj``) or proj's input online."""
    planted = []

    def random_branch(weight, quantizer, rank, iters=10):
        g = torch.Generator().manual_seed(len(planted))
        up = torch.randn(weight.shape[0], rank, generator=g, dtype=weight.dtype)
        down = torch.randn(rank, weight.shape[1], generator=g, dtype=weight.dtype) * 0.1
        planted.append(up)
        return up, down

    monkeypatch.setattr(ditas_module, "lowrank_quantize", random_branch)
    config = DiTASConfig(wbits=16, abits=16, lowrank_rank=3, alpha_grid=(0.5,), fold_proj=fold_proj)
    model, _ = _run(config, calib)
    assert len(planted) == 8
    assert _error(model, outlier_dit()) < 1e-5
    qkv_up = planted[1]  # search order per block: proj, qkv, fc1, fc2
    assert qkv_up.shape == (3 * HIDDEN, 3)
    attn = model.blocks[0].attn
    torch.testing.assert_close(attn.qkv.lowrank_up[: 2 * HIDDEN], qkv_up[: 2 * HIDDEN])
    v_rows_moved = not torch.allclose(attn.qkv.lowrank_up[2 * HIDDEN :], qkv_up[2 * HIDDEN :])
    assert v_rows_moved == fold_proj
    assert (attn.proj.input_scale is None) == fold_proj


def test_reported_mse_is_the_quantized_layer_error(calib):
    """The search scores what the model will compute: with every other layer in float, the
    folded, quantized fc1 (low-rank branch, dynamic ranges per step) has exactly the
    reported output MSE on the search steps."""
    name = "blocks.0.mlp.fc1"
    keep = {pattern: {"keep": True} for pattern in ("blocks.0.attn.*", "*.fc2", "blocks.1.*")}
    config = DiTASConfig(lowrank_rank=4, search_steps=2, overrides=keep)
    model, report = _run(config, calib)
    assert list(report["layers"]) == [name]
    fp = outlier_dit()
    outputs = {}
    hooks = [
        m.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, key=key: outputs.setdefault(key, []).append(out)
        )
        for key, m in (("fp", fp), ("quantized", model))
    ]
    with torch.no_grad():
        for step in (0, 1):  # one batch per step, as the dynamic ranges assume
            keep_entries = calib.step == step
            for m in (fp, model):
                m(calib.x[keep_entries], calib.t[keep_entries], calib.y[keep_entries])
    for hook in hooks:
        hook.remove()
    error = torch.cat(outputs["quantized"]) - torch.cat(outputs["fp"])
    measured = float(error.double().pow(2).mean())
    assert measured == pytest.approx(report["layers"][name]["output_mse"]["ditas"], rel=1e-4)


def _reference_column_group_quant(w, bits, group=32):
    """Asymmetric min/max per strided column group (rows r + i·C_out/g), float64."""
    out = np.empty_like(w)
    count = w.shape[0] // group
    for r in range(count):
        rows = [r + i * count for i in range(group)]
        for j in range(w.shape[1]):
            out[rows, j] = _reference_fake_quant(w[rows, j], bits)
    return out


def _reference_fake_quant(values, bits):
    low, high = min(values.min(), 0.0), max(values.max(), 0.0)
    scale = max((high - low) / (2**bits - 1), 1e-8)
    zero = np.round(-low / scale)
    return (np.clip(np.round(values / scale) + zero, 0, 2**bits - 1) - zero) * scale


def _fp_inputs_by_step(calib, name):
    """The FP model's inputs of layer ``name``, per calibration step, in float64."""
    model = outlier_dit()
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).double().numpy())
    )
    by_step = {}
    with torch.no_grad():
        for step in torch.unique(calib.step).tolist():
            keep = calib.step == step
            model(calib.x[keep], calib.t[keep], calib.y[keep])
            by_step[step] = rows.pop()
    handle.remove()
    return model.get_submodule(name).weight.detach().double().numpy(), by_step


def test_alpha_search_matches_a_float64_brute_force(calib):
    """W8A6, where the activation error (the part α changes) dominates."""
    name = "blocks.0.mlp.fc1"
    config = DiTASConfig(wbits=8, abits=6, lowrank_rank=0, search_steps=2)
    _, report = _run(config, calib)
    assert report["search_steps"] == [0, 1] and report["tas_entries"] == len(calib)
    weight, by_step = _fp_inputs_by_step(calib, name)
    salience_a = np.abs(np.concatenate(list(by_step.values()))).max(axis=0)  # TAS: all steps
    salience_b = np.abs(_reference_column_group_quant(weight, 8)).max(axis=0)
    losses = []
    for alpha in ALPHA_GRID:
        s = np.maximum(salience_a**alpha / salience_b ** (1 - alpha), 1e-4)
        quantized_weight = _reference_column_group_quant(weight * s, 8)
        loss = 0.0
        for step in (0, 1):  # the search steps; dynamic per-tensor range per step
            x = by_step[step]
            scaled = x / s
            x_q = _reference_fake_quant(scaled, 6)
            loss += np.sum((x @ weight.T - x_q @ quantized_weight.T) ** 2)
        losses.append(loss)
    losses = np.array(losses)
    assert losses.max() > 1.5 * losses.min(), "the test needs α to matter"
    layer = report["layers"][name]
    rows = sum(len(by_step[step]) for step in (0, 1))
    np.testing.assert_allclose(np.array(layer["mse_by_alpha"]) * rows * 128, losses, rtol=2e-3)
    chosen = ALPHA_GRID.index(layer["alpha"])
    assert losses[chosen] <= losses.min() * (1 + 2e-3)
    assert layer["output_mse"]["ditas"] == min(layer["mse_by_alpha"])


@pytest.mark.parametrize(
    ("wbits", "abits", "rank", "gain"),
    [
        (4, 8, 4, 0.75),  # W4A8: 4-bit weight error dominates; the low-rank branch carries it
        (8, 6, 0, 0.6),  # activation error dominates: smoothing alone carries it
    ],
)
def test_beats_rtn_on_outlier_channels(calib, wbits, abits, rank, gain):
    """Against RTN with the same quantizers (column groups, dynamic per-tensor activations).
    With column groups, smoothing leaves the weight error unchanged (Q(W s) = Q(W) s), so
    it only shrinks the activation error."""
    rtn = outlier_dit()
    rtn_config = RTNConfig(
        wbits=wbits,
        abits=abits,
        a_dynamic=True,
        w_granularity="column_group_strided",
        w_group_size=32,
    )
    run_unpacked(METHODS["rtn"], rtn, rtn_config, calib)
    model, report = _run(DiTASConfig(wbits=wbits, abits=abits, lowrank_rank=rank), calib)
    assert _error(model, outlier_dit()) < gain * _error(rtn, outlier_dit())
    qkv = report["layers"]["blocks.0.attn.qkv"]
    assert qkv["output_mse"]["ditas"] < 0.7 * qkv["output_mse"]["rtn"]
    assert qkv["smoothing"]["max"] > 2  # the outlier channel is divided down
    if rank:
        lowrank = report["layers"]["blocks.1.mlp.fc2"]["lowrank"]
        assert lowrank["weight_error_lowrank"] < lowrank["weight_error_plain"]


def test_static_activations_and_input_channel_groups(calib):
    config = DiTASConfig(
        wbits=8, abits=8, a_dynamic=False, w_granularity="group", w_group_size=16, lowrank_rank=2
    )
    model, report = _run(config, calib)
    assert len(report["activation_ranges"]) == 8
    assert all(layer.act_quantizer.calibrated for layer in quantized_layers(model).values())
    assert 0 < _error(model, outlier_dit()) < 0.05
    model, report = _run(DiTASConfig(wbits=8, abits=8, a_granularity="token"), calib)
    assert report["activation_ranges"] == {}
    assert 0 < _error(model, outlier_dit()) < 0.05


def test_fc2_smoothing_is_optional(calib):
    model, report = _run(DiTASConfig(smooth_fc2=False, lowrank_rank=0), calib)
    assert "alpha" not in report["layers"]["blocks.0.mlp.fc2"]
    assert model.blocks[0].mlp.fc2.input_scale is None
    model, report = _run(DiTASConfig(lowrank_rank=0, alpha_grid=(1.0,)), calib)
    assert model.blocks[0].mlp.fc2.input_scale is not None


def test_subsampled_search_keeps_exact_per_step_ranges(calib):
    model, name = outlier_dit(), "blocks.0.attn.qkv"
    search = calib.subset([0, 1])
    rows = capture_inputs(model, search, name, progress=False)
    full = _SearchInputs(rows, search, 0, "cpu")
    sampled = _SearchInputs(rows, search, 40, "cpu")
    assert full.num_rows == 2 * 8 * 16 and sampled.num_rows == 40
    for (rows, low, high), (_, full_low, full_high) in zip(
        sampled.groups, full.groups, strict=True
    ):
        assert len(rows) == 20
        assert torch.equal(low, full_low) and torch.equal(high, full_high)
    _run(DiTASConfig(lowrank_rank=0, search_max_tokens=40), calib)


def test_defaults_validation_and_registration():
    config = DiTASConfig()
    assert (config.wbits, config.abits, config.a_dynamic) == (4, 8, True)
    assert config.weight_spec().describe() == "int4 asym per-column-group(32, strided) minmax"
    assert config.act_spec().describe() == "int8 asym per-tensor dynamic"
    assert config.alpha_grid == ALPHA_GRID and len(ALPHA_GRID) == 21 and ALPHA_GRID[-1] == 1.0
    assert (config.lowrank_rank, config.lowrank_iters, config.smooth_fc2) == (32, 10, True)
    assert DiTASConfig(alpha_grid=("0", " 0.5")).alpha_grid == (0.0, 0.5)
    assert DiTASConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for kwargs, message in [
        (dict(alpha_grid=("0", "x")), "comma-separated numbers"),
        (dict(alpha_grid=(1.5,)), r"\[0, 1\]"),
        (dict(alpha_grid=()), "at least one"),
        (dict(lowrank_rank=-1), "--lowrank-rank"),
        (dict(lowrank_iters=0), "--lowrank-iters"),
    ]:
        with pytest.raises(DitqError, match=message):
            DiTASConfig(**kwargs)
    method = METHODS["ditas"]
    assert method.config_class is DiTASConfig
    calib = method.default_calib
    assert (calib.sampler, calib.num_steps, calib.steps, calib.cfg_scale) == (
        "ddpm",
        100,
        "all",
        1.5,
    )
    with pytest.raises(DitqError, match="calibration set"):
        run_unpacked(method, tiny_dit(), config, None)


@pytest.fixture(scope="module")
def model_args(tmp_path_factory):
    return save_checkpoint(outlier_dit(), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _cli(model_args, out, *extra):
    return main(
        [
            "quantize",
            *model_args,
            "--out",
            str(out),
            "--method",
            "ditas",
            "--calib-samples",
            "2",
            "--calib-sampler",
            "ddim",
            "--calib-num-steps",
            "4",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]
    )


def test_cli_quantize_then_sample(model_args, tmp_path, capsys):
    out = tmp_path / "q"
    assert _cli(model_args, out, "--lowrank-rank", "4", "--alpha-grid", "0,0.5,1") == 0
    assert "ditas W4A8" in capsys.readouterr().out  # the method's bits without --wbits
    manifest = json.loads((out / "ditq.json").read_text())
    assert manifest["method_config"]["alpha_grid"] == [0.0, 0.5, 1.0]
    assert manifest["method_config"]["lowrank_rank"] == 4
    qkv = manifest["layers"]["blocks.0.attn.qkv"]
    assert qkv["lowrank_rank"] == 4
    assert qkv["weight"]["granularity"] == {
        "type": "per_column_group",
        "group_size": 32,
        "strided": True,
    }
    assert manifest["layers"]["blocks.0.mlp.fc2"]["input_scale"]
    report = json.loads((out / "calibration_report.json").read_text())
    assert {layer["alpha"] for layer in report["method"]["layers"].values()} <= {0.0, 0.5, 1.0}
    assert report["method"]["search_steps"] == [0, 1, 2, 3]  # all steps of the 4-step run
    samples = tmp_path / "s.npz"
    args = ["sample", "--model", str(out), "--vae", "none", "--sampler", "ddim", "--steps", "3"]
    args += ["--num-samples", "2", "--out", str(samples), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    assert np.load(samples)["arr_0"].shape == (2, 8, 8, 3)


def test_cli_rejects_bad_alpha_grid(model_args, tmp_path, capsys):
    assert _cli(model_args, tmp_path / "q", "--alpha-grid", "0,2") == 2
    err = capsys.readouterr().err
    assert "--alpha-grid" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()
