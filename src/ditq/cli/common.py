"""Options shared by several subcommands and the helpers that read them."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch

from ditq.diffusion.pipeline import SamplingSettings
from ditq.errors import DitqError
from ditq.models.dit import ARCHITECTURES


def parse_names(text: str, choices: Iterable[str], flag: str) -> list[str]:
    """A comma-separated list of names, each one of ``choices`` (one clear error if not)."""
    choices = list(choices)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise DitqError(f"{flag} {text!r}: choose from {', '.join(choices)}")
    return names


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model`` and the architecture flags of ``ditq sample``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        required=True,
        help="checkpoint file (.pt/.pth/.safetensors), a ditq quantized directory, or an "
        "official name (DiT-XL-2-256, DiT-XL-2-512)",
    )
    group.add_argument("--arch", help=f"architecture ({', '.join(ARCHITECTURES)})")
    group.add_argument("--input-size", type=int, help="latent (or pixel) side length")
    group.add_argument("--in-channels", type=int, help="4 for latent models, 3 for pixels")
    group.add_argument("--num-classes", type=int, help="number of classes (without the null)")
    group.add_argument(
        "--num-heads", type=int, help="attention heads (default: official value, else width/64)"
    )
    group.add_argument(
        "--vae",
        default="auto",
        help="auto (none for a 3-channel pixel-space model, else ema), none, ema or mse "
        "(sd-vae-ft-*), or a diffusers directory",
    )
    group.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1, ...")
    group.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))


def add_sampling_args(parser: argparse.ArgumentParser, steps: int = 250) -> None:
    """Sampler, steps, guidance and seed."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    group.add_argument("--steps", type=int, default=steps, help="respaced sampling steps")
    group.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale (1 = off)")
    group.add_argument(
        "--cfg-channels",
        type=int,
        default=3,
        help="eps channels guidance applies to (official 3; 0 = all)",
    )
    group.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    group.add_argument(
        "--clip-denoised",
        choices=("auto", "on", "off"),
        default="auto",
        help="clip x0 to [-1, 1]: auto = on for pixel models, off for latent models",
    )
    group.add_argument(
        "--respacing", help="ADM respacing string overriding --steps (e.g. ddim50, 10,15,20)"
    )
    group.add_argument("--seed", type=int, default=0)


def read_prompts(path: str, flag: str) -> list[str]:
    """The non-empty lines of a prompt file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DitqError(f"{flag} {path}: cannot read it ({err}); pass a text file") from err
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DitqError(f"{flag} {path} holds no prompt: write one prompt per line")
    return prompts


def model_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`ditq.load_model` from the parsed flags."""
    return dict(
        arch=args.arch,
        input_size=args.input_size,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        num_heads=args.num_heads,
        dtype=args.dtype,
        device=args.device,
    )


def sampling_settings(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(
        sampler=args.sampler,
        steps=args.steps,
        respacing=args.respacing,
        cfg_scale=args.cfg_scale,
        cfg_channels=args.cfg_channels or None,
        eta=args.eta,
        clip_denoised={"auto": None, "on": True, "off": False}[args.clip_denoised],
        seed=args.seed,
    )
