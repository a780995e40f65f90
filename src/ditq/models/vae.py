"""Latent decoding with diffusers' ``AutoencoderKL`` (optional extra ``ditq[vae]``)."""

from __future__ import annotations

import torch
from torch import nn

from ditq.errors import DitqError

VAE_NAMES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(name: str, device: str | torch.device = "cpu") -> nn.Module | None:
    """The Stable Diffusion VAE the official DiT decodes with (``ema``/``mse``), a local
    diffusers directory, or ``None`` for ``"none"`` (pixel-space models)."""
    if name == "none":
        return None
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise DitqError(
            "decoding latents needs diffusers: pip install 'ditq[vae]' (or pass --vae none "
            "for a pixel-space model)"
        ) from err
    source = VAE_NAMES.get(name, name)
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise DitqError(
            f"could not load the VAE {source!r}: {err}. Use --vae ema|mse on a machine that "
            f"reaches the Hugging Face hub, a local diffusers directory, or --vae none"
        ) from err
    return vae.to(device).eval()


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from DiT latents (official: ``vae.decode(z / 0.18215)``)."""
    scaling = getattr(getattr(vae, "config", None), "scaling_factor", 0.18215)
    return vae.decode(latents.to(next(vae.parameters()).dtype) / scaling).sample.float()
