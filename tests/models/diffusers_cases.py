"""What the diffusers-family tests share: method settings sized for tiny transformers
(hidden 32), fixed inputs, the error measure and the linears' call order."""

import torch
from torch import nn

SETTINGS = {
    "ptq4dit": {"recon_iters": 3, "recon_batch_size": 4, "recon_chunks": 2},
    "ditas": {"lowrank_rank": 4},
    "single-step": {"w_group_size": 8},
    "gptq": {"w_group_size": 8},
    "svdquant": {"w_group_size": 8, "a_group_size": 8, "lowrank_rank": 4},
}


def inputs(labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three 4-channel 8x8 latents at timesteps 5, 500 and 900 with ``labels``."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    return x, torch.tensor([5, 500, 900]), torch.tensor(labels)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linears_in_call_order(model: nn.Module, *args: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Names of ``model``'s ``nn.Linear`` modules in the order one forward on ``args`` calls
    them (repeats kept), and that forward's output."""
    names = {module: name for name, module in model.named_modules()}
    called: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda module, _: called.append(names[module]))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            out = model(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return called, out
