"""What the diffusers-family tests share: method settings sized for tiny transformers
(hidden 32), fixed inputs and the error measure."""

import torch

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
