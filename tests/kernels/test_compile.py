"""Compiled sampling: CUDA-graph steps at every denoiser call, and when graphs are used."""

import pytest
import torch

from ditq.errors import DitqError
from ditq.eval.speed import denoiser_inputs
from ditq.kernels.compile import compile_denoiser, mark_cuda_graph_steps, use_cuda_graphs

from conftest import tiny_dit


def test_cuda_graph_steps_begin_at_every_denoiser_call(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = tiny_dit()
    inputs = denoiser_inputs(model, 1, "cpu", torch.float32)
    expected = model.forward_with_cfg(*inputs, cfg_scale=1.5)
    mark_cuda_graph_steps(model)
    torch.testing.assert_close(model.forward_with_cfg(*inputs, cfg_scale=1.5), expected)
    assert marks  # at least one mark per call, before any block runs
    count = len(marks)
    model(*inputs)
    assert len(marks) == count + 1


def test_cuda_graphs_by_default_for_compiled_sampling_on_a_gpu():
    assert use_cuda_graphs(None, True, "cuda")
    assert use_cuda_graphs(None, True, "cuda:1")
    assert not use_cuda_graphs(None, False, "cuda")  # not compiled
    assert not use_cuda_graphs(None, True, "cpu")
    assert not use_cuda_graphs(False, True, "cuda")
    for compiled, device in ((False, "cuda"), (True, "cpu")):
        with pytest.raises(DitqError, match="--cuda-graphs replays compiled blocks on a GPU"):
            use_cuda_graphs(True, compiled, device)


class _Recorder:
    """A stand-in for ``torch.compile``: records what is compiled with which mode and runs
    it as is, its outputs written into one reused buffer (as a CUDA graph's are)."""

    def __init__(self):
        self.compiled = []

    def __call__(self, fn, mode=None):
        self.compiled.append((fn, mode))
        buffer = {}

        def replay(*args, **kwargs):
            out = fn(*args, **kwargs)
            buffer.setdefault("out", torch.empty_like(out)).copy_(out)
            return buffer["out"]

        return replay


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["compiled", "cuda-graphs"])
def test_whole_call_scope_compiles_forward_once_and_copies_graph_outputs(monkeypatch, cuda_graphs):
    """``scope="model"``: one graph for the whole call, no block compiled apart; with CUDA
    graphs the outputs are copied out of the graph's reused buffer, so an earlier call's
    output survives the next call (a multistep sampler keeps earlier predictions)."""
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    recorder = _Recorder()
    monkeypatch.setattr(torch, "compile", recorder)
    model = tiny_dit()
    monkeypatch.setattr(torch.nn.Module, "compile", lambda *a, **k: pytest.fail("block compiled"))
    first_inputs = denoiser_inputs(model, 1, "cpu", torch.float32)
    second_inputs = (first_inputs[0] + 1, *first_inputs[1:])
    expected = [model(*inputs) for inputs in (first_inputs, second_inputs)]
    compile_denoiser(model, cuda_graphs=cuda_graphs, scope="model")
    assert [mode for _, mode in recorder.compiled] == ["reduce-overhead" if cuda_graphs else None]
    first = model(*first_inputs)
    second = model(*second_inputs)
    torch.testing.assert_close(second, expected[1])
    if cuda_graphs:
        torch.testing.assert_close(first, expected[0])  # not overwritten by the second call
    else:
        assert first is second  # the stand-in's reused buffer, returned as the graph's


def test_block_scope_compiles_each_block(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, mode=None: compiled.append(mode))
    model = tiny_dit()
    compile_denoiser(model, cuda_graphs=False, scope="blocks")
    assert compiled == [None] * len(model.blocks)
    with pytest.raises(DitqError, match="compile scope 'layers'"):
        compile_denoiser(model, scope="layers")
