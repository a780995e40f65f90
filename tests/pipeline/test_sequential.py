"""The sequential driver with the AdaRound solver on a tiny DiT: schedule, loss, error
reduction, learned step sizes, unit order, resuming, no-op and bad input."""

import pytest
import torch

from ditq.calib.hooks import capture_block_io
from ditq.errors import DitqError
from ditq.methods import METHODS, RTNConfig
from ditq.pipeline.adaround_solver import (
    AdaRoundSolver,
    ReconSettings,
    _learned_scales,
    _static_act_quantizers,
    compiled_objective,
    minibatch_indices,
    minibatch_pools,
    pool_of_iteration,
    reconstruction_loss,
    rounding_beta,
    unit_objective,
)
from ditq.pipeline.config import LayerOverride, LayerSelection
from ditq.pipeline.sequential import (
    RESUME_RTOL,
    SequentialSettings,
    UnitCall,
    UnitData,
    run_sequential,
)
from ditq.pipeline.steps import activation_quantizers, pack_model, quantized_layers
from ditq.quant.adaround import adaround
from ditq.quant.layers import QuantLinear
from ditq.quant.quantizer import Quantizer

from conftest import check_block_inputs_match_capture, run_unpacked, tiny_dit

W4A8 = dict(wbits=4, abits=8, attn_bits=8)


def _rtn(calib, depth=2, **config):
    model = tiny_dit(depth=depth)
    run_unpacked(METHODS["rtn"], model, RTNConfig(**{**W4A8, **config}), calib)
    return model


def reconstruct_model(model, fp, calib, settings, driver=None, **options):
    """AdaRound block reconstruction through the sequential driver."""
    return run_sequential(model, fp, calib, AdaRoundSolver(settings), driver, **options)


def test_beta_schedule_warmup_then_linear_decay():
    settings = ReconSettings(iters=100, warmup=0.2, beta_start=20.0, beta_end=2.0)
    assert [rounding_beta(i, settings) for i in range(19)] == [None] * 19
    assert rounding_beta(19, settings) == 20.0  # step 20 = end of the warm-up
    assert rounding_beta(59, settings) == pytest.approx(11.0)  # halfway through the decay
    assert rounding_beta(99, settings) == pytest.approx(2.0)
    no_warmup = ReconSettings(iters=10, warmup=0.0)
    assert rounding_beta(0, no_warmup) == pytest.approx(2.0 + 18.0 * 0.9)


def test_loss_sums_over_tokens_and_averages_the_rest():
    output, target = torch.zeros(2, 5, 3), torch.zeros(2, 5, 3)
    output[0, :, 0] = 2.0  # one sample, one channel, every token off by 2
    # p=2: sum over 5 tokens of 4 = 20, averaged over 2 samples x 3 channels
    assert float(reconstruction_loss(output, target, 2.0)) == pytest.approx(20 / 6)
    assert float(reconstruction_loss(output, target, 1.0)) == pytest.approx(10 / 6)


def _block_mse(model, fp, calib):
    """Mean squared error of block 0's output on the quantized model's block inputs."""
    inputs = capture_block_io(model, calib, "blocks.0", progress=False)
    target = capture_block_io(fp, calib, "blocks.0", progress=False).out
    with torch.no_grad():
        output = model.blocks[0](*inputs.args)
    return float((output - target).pow(2).mean())


def test_block_reconstruction_beats_rounding_to_nearest(calib):
    fp, model = tiny_dit(depth=1), _rtn(calib, depth=1)
    rtn_state = {k: v.clone() for k, v in model.state_dict().items()}
    act = {n: q.scale.clone() for n, q in activation_quantizers(model).items()}
    before = _block_mse(model, fp, calib)
    settings = ReconSettings(iters=200, batch_size=8, weight_lr=3e-2)
    blocks_only = SequentialSettings(layerwise_extra=False)
    report = reconstruct_model(model, fp, calib, settings, blocks_only, progress=False)
    after = _block_mse(model, fp, calib)
    assert after < 0.6 * before
    unit = report["units"]["blocks.0"]
    tokens = 16
    assert unit["initial_loss"] == pytest.approx(tokens * before, rel=1e-4)
    assert unit["final_loss"] == pytest.approx(tokens * after, rel=1e-4)
    assert unit["iterations"] == 200 and unit["rounding_layers"] == 4 and unit["act_scales"] == 8
    assert list(report["units"]) == ["blocks.0"]
    # rounding: weights on the grid, some rounded the other way than nearest, none further
    changed = 0
    for name, layer in quantized_layers(model).items():
        assert isinstance(layer.weight_quantizer, Quantizer)
        assert torch.equal(layer.quantized_weight().detach(), layer.weight.detach())
        assert layer.weight.requires_grad and not list(layer.weight_quantizer.parameters())
        rtn = rtn_state[f"{name}.weight"]
        quantizer = layer.weight_quantizer
        rtn_weight = quantizer(rtn)
        step = quantizer.scale.max()
        assert (layer.weight - rtn_weight).abs().max() <= step * 1.0001
        changed += int((layer.weight != rtn_weight).sum())
    assert changed > 0
    # learned step sizes: changed, frozen back into buffers
    moved = 0
    for name, quantizer in activation_quantizers(model).items():
        assert not quantizer.learning and "scale" in dict(quantizer.named_buffers())
        moved += int(not torch.equal(quantizer.scale, act[name]))
    assert moved == len(act)
    # the model still packs (integer codes of the learned rounding)
    pack_model(model)


def test_learned_scales_can_be_switched_off_and_units_follow_forward_order(calib):
    config = dict(
        layers=LayerSelection(embedders=True, adaln=True, final_layer=True),
        overrides={"x_embedder.proj": LayerOverride(keep=True)},
    )
    fp, model = tiny_dit(), _rtn(calib, **config)
    act = {n: q.scale.clone() for n, q in activation_quantizers(model).items()}
    settings = ReconSettings(iters=3, batch_size=4, learn_act_scales=False)
    report = reconstruct_model(model, fp, calib, settings, progress=False)
    assert report["solver"] == "adaround"
    assert list(report["units"]) == [
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "blocks.0",
        "blocks.1",
        "final_layer.adaLN_modulation.1",
        "final_layer.linear",
    ]
    assert report["units"]["blocks.0"]["rounding_layers"] == 5  # adaLN too
    assert all(torch.equal(q.scale, act[n]) for n, q in activation_quantizers(model).items())
    blocks_only = SequentialSettings(layerwise_extra=False)
    report = reconstruct_model(
        _rtn(calib, **config), fp, calib, settings, blocks_only, progress=False
    )
    assert list(report["units"]) == ["blocks.0", "blocks.1"]


@pytest.mark.slow  # Inductor's code generation of a whole block's step, twice
@pytest.mark.parametrize("graphs", [False, True], ids=["compiled", "cuda-graphs-mode"])
def test_compiled_step_equals_the_eager_step(calib, graphs):
    """The reconstruction step through torch.compile (on by default on a GPU; on the CPU
    the CUDA graphs mode compiles without graphs) computes the eager loss and the same
    gradients of the rounding variables and step sizes (the regularized objective: both of
    its terms)."""
    model, fp = _rtn(calib, depth=1), tiny_dit(depth=1)
    io = capture_block_io(model, calib, "blocks.0", progress=False)
    target = capture_block_io(fp, calib, "blocks.0", progress=False).out
    batch = {"arg0": io.args[0][:8], "arg1": io.args[1][:8], "target": target[:8]}
    block = model.blocks[0]
    settings = ReconSettings(iters=10, compile="on")
    with (
        torch.enable_grad(),
        adaround(quantized_layers(block).values()) as rounders,
        _learned_scales(_static_act_quantizers(block)) as scales,
    ):
        for rounder in rounders:  # rounding variables away from their start
            rounder.V.data += 0.3 * torch.randn_like(rounder.V)
        learned = [r.V for r in rounders] + scales
        results = []
        for objective in (unit_objective, compiled_objective(graphs)):
            loss = objective(block, batch, rounders, torch.tensor(7.0), settings)
            results.append((loss.detach(), torch.autograd.grad(loss, learned)))
    (eager, eager_grads), (fast, fast_grads) = results
    assert float(eager) > 0 and len(rounders) == 4 and len(scales) == 8
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=0)
    for ours, reference in zip(fast_grads, eager_grads, strict=True):
        assert reference.abs().max() > 0
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


@pytest.fixture
def traced_objectives(monkeypatch) -> list[bool]:
    """The solver's compiled objectives traced by dynamo and AOT autograd without Inductor's
    code generation (the tests below are about the solver's loop around them; Inductor's
    numerics are the test above's, a slow one), and the ``graphs`` argument of each."""
    modes = []

    def traced(graphs):
        modes.append(graphs)
        return torch.compile(unit_objective, backend="aot_eager")

    monkeypatch.setattr("ditq.pipeline.adaround_solver.compiled_objective", traced)
    return modes


def test_cuda_graphs_mode_runs_the_compiled_steps(calib, traced_objectives):
    """``compile="graphs"`` goes through the solver's loop (gradients cleared before each
    step, step begins marked): on the CPU, where no graph is recorded, it learns exactly
    what ``compile="on"`` does, and the learning moved the block's loss."""
    fp = tiny_dit(depth=1)
    models, reports = [], []
    for mode in ("on", "graphs"):
        settings = ReconSettings(iters=12, batch_size=8, weight_lr=1e-2, warmup=0.5, compile=mode)
        models.append(_rtn(calib, depth=1))
        reports.append(reconstruct_model(models[-1], fp, calib, settings, progress=False))
    assert False in traced_objectives and True in traced_objectives
    on, graphs = (r["units"]["blocks.0"] for r in reports)
    assert graphs["final_loss"] == on["final_loss"] != on["initial_loss"]
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_cuda_graphs_mode_compiles_the_layerwise_units_too(calib, traced_objectives):
    """With ``graphs`` the final layer's lone linears learn through the compiled objective
    too, to what the eager steps learn up to float rounding."""
    fp, selection = tiny_dit(depth=1), {"layers": LayerSelection(final_layer=True)}
    reports = []
    for mode in ("off", "graphs"):
        settings = ReconSettings(iters=8, batch_size=8, weight_lr=1e-2, warmup=0.5, compile=mode)
        model = _rtn(calib, depth=1, **selection)
        reports.append(reconstruct_model(model, fp, calib, settings, progress=False)["units"])
    assert traced_objectives and all(traced_objectives)  # the graphs run's units only
    eager, graphs = reports
    assert list(graphs) == ["blocks.0", "final_layer.linear"]
    for name, unit in graphs.items():
        assert unit["final_loss"] == pytest.approx(eager[name]["final_loss"], rel=1e-3)


def test_graphs_mode_compiles_every_unit_kind_of_the_official_coverage(calib, monkeypatch):
    """PTQ4DiT's official coverage has six unit kinds (patch embedding, the timestep MLP's
    two linears, blocks, the final adaLN and linear), each compiled with and without the
    rounding regularizer: more graphs than dynamo's default limit of 8 per function, past
    which the later units (the blocks) would silently run eagerly. Traced without Inductor
    (the limit is dynamo's), with the limit made an error."""
    compiled = []

    def traced(graphs):
        compiled.append(graphs)
        return torch.compile(unit_objective, backend="eager")

    monkeypatch.setattr("ditq.pipeline.adaround_solver.compiled_objective", traced)
    torch._dynamo.reset()
    model = _rtn(calib, depth=1, layers=LayerSelection.everything())
    settings = ReconSettings(iters=4, batch_size=8, warmup=0.5, compile="graphs")
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        report = reconstruct_model(model, tiny_dit(depth=1), calib, settings, progress=False)
    assert len(report["units"]) == len(compiled) == 6
    assert all(unit["final_loss"] > 0 for unit in report["units"].values())


def test_compile_mode_selects_blocks_on_a_gpu(calib):
    model = _rtn(calib, depth=1)
    data = UnitData({"arg0": torch.zeros(2, 3)}, torch.device("cpu"), SequentialSettings(), None)
    block, linear = UnitCall("blocks.0", model.blocks[0], True), UnitCall("x", model, False)
    chosen = {
        mode: [
            AdaRoundSolver(ReconSettings(compile=mode)).compiles(u, data) for u in (block, linear)
        ]
        for mode in ("auto", "on", "graphs", "off")
    }
    assert chosen == {
        "auto": [False, False],
        "on": [True, False],
        "graphs": [True, True],
        "off": [False, False],
    }
    data.device = torch.device("cuda")  # where its cache would be on a GPU
    assert AdaRoundSolver(ReconSettings()).compiles(block, data)
    with pytest.raises(DitqError, match="compile='fast'"):
        ReconSettings(compile="fast")


def test_interrupted_run_resumes_to_the_same_model(calib, tmp_path, monkeypatch):
    settings = ReconSettings(iters=30, batch_size=8, weight_lr=1e-2)
    fp = tiny_dit()
    selection = {"layers": LayerSelection(final_layer=True)}
    reference = _rtn(calib, **selection)
    reconstruct_model(reference, fp, calib, settings, progress=False)

    spilling = SequentialSettings(host_cache_gb=0.0)
    solve = AdaRoundSolver.solve

    def crash_at_block_1(self, unit, *args, **kwargs):
        if unit.name == "blocks.1":
            raise KeyboardInterrupt
        return solve(self, unit, *args, **kwargs)

    monkeypatch.setattr(AdaRoundSolver, "solve", crash_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_model(
            _rtn(calib, **selection),
            fp,
            calib,
            settings,
            spilling,
            progress=False,
            cache_dir=tmp_path,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.0.pt"]
    monkeypatch.undo()

    resumed = _rtn(calib, **selection)
    report = reconstruct_model(
        resumed, fp, calib, settings, spilling, progress=False, cache_dir=tmp_path
    )
    assert [u["resumed"] for u in report["units"].values()] == [True, False, False]
    assert report["units"]["blocks.1"]["cache"] == "disk"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "blocks.0.pt",
        "blocks.1.pt",
        "final_layer.linear.pt",
    ]
    expected = reference.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key

    other = ReconSettings(iters=31, batch_size=8, weight_lr=1e-2)
    with pytest.raises(DitqError, match="delete it"):
        reconstruct_model(
            _rtn(calib, **selection), fp, calib, other, progress=False, cache_dir=tmp_path
        )


def _rerun_scaled(calib, fp, settings, cache_dir, relative_change):
    """The RTN model with blocks.0's fc1 weights scaled by ``1 + relative_change``,
    reconstructed again from ``cache_dir``; the model and its units' report entries."""
    model = _rtn(calib)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.mul_(1 + relative_change)
    report = reconstruct_model(model, fp, calib, settings, progress=False, cache_dir=cache_dir)
    return model, report["units"]


def test_a_state_rounded_otherwise_resumes_and_another_state_is_refused(calib, tmp_path):
    """Resumed on another GPU, a unit's state before solving can differ by float rounding (a
    relative 3e-7 here): its checkpoint is taken; a state 1 % away is refused, and so is a
    differing one against a checkpoint of an earlier ditq, which kept only the bytes' digest."""
    settings = ReconSettings(iters=5, batch_size=8)
    fp = tiny_dit()
    solved = _rtn(calib)
    reconstruct_model(solved, fp, calib, settings, progress=False, cache_dir=tmp_path)

    def rerun(relative_change):
        return _rerun_scaled(calib, fp, settings, tmp_path, relative_change)

    model, units = rerun(3e-7)
    assert [u["resumed"] for u in units.values()] == [True, True]
    assert 1e-7 < units["blocks.0"]["resume_difference"] < RESUME_RTOL
    assert units["blocks.1"]["resume_difference"] == 0.0
    expected = solved.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key

    with pytest.raises(DitqError, match="differs by [0-9.]+e-02, relative"):
        rerun(1e-2)

    checkpoint = tmp_path / "blocks.0.pt"
    saved = torch.load(checkpoint, weights_only=True)
    torch.save({k: saved[k] for k in ("fingerprint", "state", "report")}, checkpoint)
    assert rerun(0.0)[1]["blocks.0"]["resume_difference"] == 0.0
    with pytest.raises(DitqError, match="delete it") as refused:
        rerun(3e-7)
    assert "differs by" not in str(refused.value)


def test_a_checkpoint_of_another_device_type_resumes_within_rounding_else_names_it(calib, tmp_path):
    """A unit saved by a run on CUDA (its checkpoint's ``device_type``): a CPU run whose state
    matches resumes it; one whose state differs is told to resume on CUDA, since the two
    device types draw different random samples for the activation ranges."""
    settings = ReconSettings(iters=5, batch_size=8)
    fp = tiny_dit()
    reconstruct_model(_rtn(calib), fp, calib, settings, progress=False, cache_dir=tmp_path)
    checkpoint = tmp_path / "blocks.0.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["device_type"] == "cpu"
    torch.save({**saved, "device_type": "cuda"}, checkpoint)

    units = _rerun_scaled(calib, fp, settings, tmp_path, 0.0)[1]
    assert units["blocks.0"]["resume_difference"] == 0.0

    with pytest.raises(DitqError) as refused:
        _rerun_scaled(calib, fp, settings, tmp_path, 1e-2)
    message = str(refused.value)
    assert "written by a run on cuda and this one is on cpu" in message
    assert "differs by" in message and "resume it on cuda (--device)" in message


def test_zero_iterations_is_a_no_op(calib):
    model = _rtn(calib)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = reconstruct_model(model, tiny_dit(), calib, ReconSettings(iters=0), progress=False)
    assert report["units"] == {}
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in state.items())


def test_bad_input_raises_ditq_errors(calib):
    model = _rtn(calib)
    with pytest.raises(DitqError, match="full-precision"):
        reconstruct_model(model, model, calib, ReconSettings(iters=1), progress=False)
    with pytest.raises(DitqError, match="warmup"):
        ReconSettings(warmup=1.0)
    with pytest.raises(DitqError, match="beta_end"):
        ReconSettings(beta_start=2.0, beta_end=20.0)
    uncalibrated = tiny_dit()
    layer = QuantLinear.from_linear(uncalibrated.blocks[0].attn.qkv, *_specs())
    uncalibrated.blocks[0].attn.qkv = layer
    with pytest.raises(DitqError, match="calibrate_weights"):
        reconstruct_model(uncalibrated, tiny_dit(), calib, ReconSettings(iters=1), progress=False)
    pack_model(model)
    with pytest.raises(DitqError, match="before pack_model"):
        reconstruct_model(model, tiny_dit(), calib, ReconSettings(iters=1), progress=False)


def _specs():
    config = RTNConfig(**W4A8)
    return config.weight_spec(), config.act_spec()


def test_official_data_schedule_visits_each_chunk_in_turn():
    """block_recon.py: the shuffled set in 10 parts, iters // 10 steps on each part."""
    steps = [pool_of_iteration(i, 20000, 10) for i in range(20000)]
    assert steps[:2000] == [0] * 2000 and steps[2000] == 1 and steps[-1] == 9
    assert [steps.count(k) for k in range(10)] == [2000] * 10
    assert [pool_of_iteration(i, 7, 3) for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    generator = torch.Generator().manual_seed(0)
    pools = minibatch_pools(103, 10, generator)
    assert len(pools) == 10 and {len(p) for p in pools} == {10, 11}
    assert sorted(torch.cat(pools).tolist()) == list(range(103))  # a partition
    assert not torch.equal(torch.cat(pools), torch.arange(103))  # shuffled
    assert torch.equal(minibatch_pools(103, 1, generator)[0], torch.arange(103))
    with pytest.raises(DitqError, match="--recon-chunks"):
        minibatch_pools(5, 10, generator)
    # each step's minibatch: batch_size distinct sorted entries of its step's pool
    settings = ReconSettings(iters=30, batch_size=4, chunks=3)
    indices = minibatch_indices(25, settings, torch.Generator().manual_seed(1))
    pools = minibatch_pools(25, 3, torch.Generator().manual_seed(1))  # the same draw
    assert len(indices) == 30
    for iteration, index in enumerate(indices):
        pool = set(pools[pool_of_iteration(iteration, 30, 3)].tolist())
        assert len(set(index.tolist())) == 4 and set(index.tolist()) <= pool
        assert torch.equal(index, index.sort().values)
    assert len({tuple(index.tolist()) for index in indices}) > 20  # drawn anew each step


class _DeviceCache(UnitData):
    """A unit's cache as the driver keeps it on an accelerator (outputs carried to the next
    block without a host copy), here on the CPU."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.place = "device"


@pytest.mark.parametrize("cache", ["host", "device"])
def test_chained_blocks_get_the_inputs_a_capture_would(calib, monkeypatch, cache):
    """Block inputs computed from the block before (the driver's chain) equal a capture
    from the model run up to the block, with quantized embedders (so the FP and quantized
    conditionings differ) and solved blocks in between, wherever the cache is kept."""
    if cache == "device":
        monkeypatch.setattr("ditq.pipeline.sequential.UnitData", _DeviceCache)
    fp = tiny_dit(depth=3)
    model = _rtn(calib, depth=3, layers=LayerSelection(embedders=True, adaln=True))
    check_block_inputs_match_capture(model, fp, calib, monkeypatch)


@pytest.mark.parametrize("tf32", [True, False])
def test_reconstruction_steps_set_tf32_and_restore_it(calib, monkeypatch, tf32):
    """The steps run with CUDA matmuls and convolutions allowed TF32 as ``tf32`` says (the
    official script allows it globally); the global settings are restored afterwards."""
    seen = []

    def objective(*args):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return unit_objective(*args)

    monkeypatch.setattr("ditq.pipeline.adaround_solver.unit_objective", objective)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    settings = ReconSettings(iters=2, batch_size=4, compile="off", tf32=tf32)
    reconstruct_model(_rtn(calib, depth=1), tiny_dit(depth=1), calib, settings, progress=False)
    assert seen and set(seen) == {(tf32, tf32)}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
