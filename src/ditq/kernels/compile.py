"""Compiled execution of a denoiser for sampling and timing: each block, or the whole
call, under ``torch.compile`` (Inductor fuses the code around the kernels' custom ops),
optionally replaying CUDA graphs (``mode="reduce-overhead"``: one launch per block or per
call instead of one per kernel, which the quantized blocks need at every batch size)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from ditq.errors import DitqError
from ditq.models.adapter import adapter_for


def use_cuda_graphs(requested: bool | None, compiled: bool, device: str) -> bool:
    """Whether to replay CUDA graphs: ``requested`` (``--cuda-graphs``/``--no-cuda-graphs``)
    where given, which needs compiled blocks on a CUDA device; by default for compiled
    sampling on a GPU at every batch size (the quantized blocks' kernel launches bind their
    calls to the host even at batch 64; ``benchmarks/RESULTS.md``)."""
    on_gpu = torch.device(device).type == "cuda"
    if requested and not (compiled and on_gpu):
        raise DitqError(
            "--cuda-graphs replays compiled blocks on a GPU: add --compile and --device cuda, "
            "or drop --cuda-graphs"
        )
    if requested is not None:
        return requested
    return compiled and on_gpu


def mark_cuda_graph_steps(model: nn.Module) -> None:
    """Begin a new CUDA-graph step at every denoiser call of ``model`` (its previous
    outputs are consumed by then), as ``torch.compile(mode="reduce-overhead")`` asks of
    inference loops."""
    for name in ("forward", "forward_with_cfg"):
        method = getattr(model, name)

        def marked(*args, _method=method, **kwargs):
            torch.compiler.cudagraph_mark_step_begin()
            return _method(*args, **kwargs)

        setattr(model, name, marked)


COMPILE_SCOPES = ("model", "blocks")
"""What one compiled graph covers: the whole denoiser call, or each block."""
DEFAULT_COMPILE_SCOPE = "model"
"""``ditq sample --compile``'s and ``ditq bench``'s scope: one graph (and with CUDA graphs one
replay) per call, the faster scope in sampling, at small batches and at batch 64 on an H100
(``benchmarks/RESULTS.md``, "Tenth lease" and "Eleventh lease")."""


def compile_denoiser(
    model: nn.Module, cuda_graphs: bool = False, scope: str = DEFAULT_COMPILE_SCOPE
) -> nn.Module:
    """Compile ``model`` in place for sampling and timing; returns ``model``.

    ``scope="blocks"``: each block is compiled (with ``cuda_graphs``, one CUDA graph per
    block). The layers outside the blocks run eagerly, so the denoiser's output is never a
    graph's reused buffer. ``scope="model"``: the whole ``forward`` is one graph (with
    ``cuda_graphs``, one replay per call instead of 28 on the host, which bounds small
    batches), and its outputs are copied out of the graph's buffers. With ``cuda_graphs``
    every denoiser call begins a new step."""
    if scope not in COMPILE_SCOPES:
        raise DitqError(f"compile scope {scope!r}: use one of {', '.join(COMPILE_SCOPES)}")
    mode = "reduce-overhead" if cuda_graphs else None
    if scope == "blocks":
        adapter = adapter_for(model)
        for index in range(adapter.num_blocks()):
            model.get_submodule(adapter.block_name(index)).compile(mode=mode)
    elif cuda_graphs:
        compiled = torch.compile(model.forward, mode=mode)

        def forward(*args, **kwargs):  # outputs out of the graph's reused buffers
            return tree_map_only(torch.Tensor, torch.clone, compiled(*args, **kwargs))

        model.forward = forward
    else:
        model.forward = torch.compile(model.forward)
    if cuda_graphs:
        mark_cuda_graph_steps(model)
    return model
