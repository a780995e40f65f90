"""Compiled sampling: CUDA-graph steps at every denoiser call, and when graphs are used."""

import pytest
import torch

from ditq.errors import DitqError
from ditq.eval.speed import denoiser_inputs
from ditq.kernels.compile import mark_cuda_graph_steps, use_cuda_graphs

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
