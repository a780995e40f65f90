"""The GPTQ solver of the sequential driver against a by-hand run: block by block, stage
by stage (qkv, proj, fc1, fc2), each stage's Hessian from full forwards of the block's
inputs with the stages before it solved."""

import copy

import torch

from ditq.calib.hooks import capture_block_io
from ditq.methods import METHODS, RTNConfig
from ditq.pipeline.gptq_solver import GPTQSolver
from ditq.pipeline.sequential import run_sequential
from ditq.quant.gptq import GPTQSettings, HessianAccumulator, gptq_quantize

from conftest import run_unpacked, tiny_dit

STAGES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
BATCH = 8  # the driver's calibration batch in the test below


def _solve_by_hand(model, calib, settings):
    for index in range(model.config.depth):
        name = f"blocks.{index}"
        block = model.blocks[index]
        captured = capture_block_io(model, calib, name, progress=False)
        for stage in STAGES:
            layer = block.get_submodule(stage)
            hessian = HessianAccumulator()
            handle = layer.act_quantizer.register_forward_pre_hook(
                lambda _m, args, hessian=hessian: hessian.update(args[0])
            )
            with torch.no_grad():
                for rows in torch.arange(len(calib)).split(BATCH):
                    block(*(arg[rows] for arg in captured.args))
            handle.remove()
            layer.weight.data = gptq_quantize(
                layer.weight.data, hessian.result(), layer.weight_quantizer, settings
            )


def test_solver_equals_stage_by_stage_gptq_on_full_forwards(calib):
    model = tiny_dit(depth=3)
    run_unpacked(METHODS["rtn"], model, RTNConfig(wbits=4, abits=8), calib)
    by_hand, original = copy.deepcopy(model), copy.deepcopy(model)
    settings = GPTQSettings()
    report = run_sequential(
        model, None, calib, GPTQSolver(settings), batch_size=BATCH, progress=False
    )
    _solve_by_hand(by_hand, calib, settings)
    assert [unit["stages"] for unit in report["units"].values()] == [4, 4, 4]
    expected = dict(by_hand.named_parameters())
    for name, value in model.named_parameters():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    for index in range(3):
        for stage in STAGES:
            name = f"blocks.{index}.{stage}"
            layer, before = model.get_submodule(name), original.get_submodule(name)
            assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight), name
            assert not torch.equal(layer.weight, before.weight_quantizer(before.weight)), name
