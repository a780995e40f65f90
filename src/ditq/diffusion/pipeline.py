"""Sampling a DiT the way the official ``sample.py`` does, reproducibly per sample.

Every sample ``i`` owns a random stream seeded from ``(seed, i)``: its label (when none is
given), its initial noise and every per-step noise are drawn from it on the CPU, then moved
to the device. So a sample does not depend on the batch size, on the device, or on which
other samples are generated in the same run (which is what lets several GPUs split a run
by sample index and still reproduce a single-GPU run exactly).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.diffusion.respace import create_diffusion, respacing_for
from ditq.diffusion.samplers import sample_loop
from ditq.errors import DitqError
from ditq.models.vae import decode_latents

StepCallback = Callable[[np.ndarray, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``(sample_indices, step_index, t_model, x_t, labels)``, called at every sampling step
(step 0 is the noisiest) with the model's input at that step."""


@dataclass(frozen=True)
class SamplingSettings:
    """Sampler, steps and guidance; the defaults are the DiT papers' evaluation settings."""

    sampler: str = "ddpm"
    steps: int = 250
    respacing: str | None = None
    cfg_scale: float = 1.5
    cfg_channels: int | None = 3
    eta: float = 0.0
    clip_denoised: bool | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU random stream of sample ``index`` in a run seeded with ``seed``."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    """``"0,1,2"`` to ``[0, 1, 2]``, each checked against the model's class count."""
    if text is None or text == "":
        return None
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError as err:
        raise DitqError(f"--classes must be comma-separated integers, got {text!r}") from err
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise DitqError(f"--classes {bad or text!r}: labels must lie in 0..{num_classes - 1}")
    return classes


def make_denoiser(
    model: nn.Module, labels: torch.Tensor, cfg_scale: float, cfg_channels: int | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``denoise(x_t, t)`` for the sampler: plain forward, or the official guided forward on
    the doubled batch (conditional half, then labels replaced by the null class)."""
    dtype = next(model.parameters()).dtype
    if cfg_scale <= 1.0:

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x.to(dtype), t, labels).float()

        return denoise

    null = torch.full_like(labels, model.num_classes)
    y = torch.cat([labels, null])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        doubled = torch.cat([x, x]).to(dtype)
        out = model.forward_with_cfg(doubled, torch.cat([t, t]), y, cfg_scale, cfg_channels)
        return out[: len(x)].float()

    return guided


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW to uint8 NHWC, as the official ``sample_ddp.py`` converts."""
    images = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1)
    return images.to("cpu", dtype=torch.uint8).numpy()


def load_scheduler(path: str | Path):
    """One of diffusers' schedulers from its directory (a pipeline's ``scheduler/``, or the
    pipeline directory itself)."""
    try:
        import diffusers
    except ImportError as err:
        raise DitqError(
            "diffusers' schedulers need diffusers: pip install 'ditq[diffusers]'"
        ) from err
    for directory in (Path(path), Path(path) / "scheduler"):
        config = directory / "scheduler_config.json"
        if config.is_file():
            name = json.loads(config.read_text()).get("_class_name", "")
            scheduler_class = getattr(diffusers, name, None)
            if scheduler_class is None:
                raise DitqError(f"{config}: {name!r} is not a scheduler of this diffusers")
            return scheduler_class.from_pretrained(str(directory))
    raise DitqError(
        f"--scheduler {path}: no scheduler_config.json there or in its scheduler/ folder"
    )


def scheduler_loop(
    model: nn.Module,
    scheduler,
    x: torch.Tensor,
    labels: torch.Tensor,
    settings: SamplingSettings,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """diffusers' ``DiTPipeline`` loop with one of diffusers' schedulers: its timesteps for
    ``settings.steps`` and its update, guidance on every latent channel (not the official
    first three), the learned σ dropped; per-sample ``generators`` for stochastic updates."""
    dtype = next(model.parameters()).dtype
    scheduler.set_timesteps(settings.steps)
    guided = settings.cfg_scale > 1
    y = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        steps = torch.full((len(model_in),), int(t), device=x.device)
        if guided:
            out = model.forward_with_cfg(model_in.to(dtype), steps, y, settings.cfg_scale, None)
            out = out[: len(x)]
        else:
            out = model(model_in.to(dtype), steps, y)
        eps = out[:, : model.in_channels].float()
        x = scheduler.step(eps, t, x, generator=generators).prev_sample
    return x


@torch.no_grad()
def trajectories(
    model: nn.Module,
    num_samples: int,
    settings: SamplingSettings = SamplingSettings(),
    *,
    scheduler=None,
    classes: Sequence[int] | None = None,
    init_noise: np.ndarray | None = None,
    clip_denoised: bool = True,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    indices: Sequence[int] | None = None,
    progress: bool = True,
    step_callback: StepCallback | None = None,
    stop_after_step: int | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Run the sampler batch by batch; yields ``(sample_indices, labels, x)`` per batch
    with ``x`` the final x0, or x_t after ``stop_after_step`` (calibration needs no more).

    See :func:`generate` for the meaning of the arguments.
    """
    config = model.config
    shape = (config.in_channels, config.input_size, config.input_size)
    if init_noise is not None and (init_noise.ndim != 4 or tuple(init_noise.shape[1:]) != shape):
        raise DitqError(
            f"--init-noise has shape {tuple(init_noise.shape)}, the model needs N×{shape[0]}"
            f"×{shape[1]}×{shape[2]}"
        )
    if init_noise is not None and len(init_noise) < num_samples:
        raise DitqError(
            f"--init-noise holds {len(init_noise)} samples, fewer than --num-samples {num_samples}"
        )
    indices = np.arange(num_samples) if indices is None else np.asarray(indices)
    diffusion = create_diffusion(
        respacing_for(settings.sampler, settings.steps, settings.respacing),
        learn_sigma=config.learn_sigma,
    )
    batches = range(0, len(indices), batch_size)
    for start in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        batch = indices[start : start + batch_size]
        generators = [sample_generator(settings.seed, int(i)) for i in batch]
        labels = torch.tensor(
            [
                classes[i % len(classes)]
                if classes
                else int(torch.randint(config.num_classes, (1,), generator=g))
                for i, g in zip(batch, generators, strict=True)
            ]
        )
        x_T = torch.stack([torch.randn(shape, generator=g) for g in generators])
        if init_noise is not None:
            x_T = torch.from_numpy(np.ascontiguousarray(init_noise[batch])).float()

        def noise_fn(like: torch.Tensor, generators=generators) -> torch.Tensor:
            draws = [torch.randn(like.shape[1:], generator=g) for g in generators]
            return torch.stack(draws).to(like.device, like.dtype)

        labels = labels.to(device)
        denoise = make_denoiser(model, labels, settings.cfg_scale, settings.cfg_channels)

        def on_step(step, t_index, t_model, x_t, out, batch=batch, labels=labels) -> None:
            step_callback(batch, step, t_model, x_t, labels)

        if scheduler is not None:
            x = scheduler_loop(model, scheduler, x_T.to(device), labels, settings, generators)
            yield batch, labels, x
            continue
        x = sample_loop(
            denoise,
            x_T.to(device),
            diffusion,
            sampler=settings.sampler,
            noise_fn=noise_fn,
            clip_denoised=clip_denoised,
            eta=settings.eta,
            progress=progress,
            callback=on_step if step_callback is not None else None,
            stop_after_step=stop_after_step,
        )
        yield batch, labels, x


@torch.no_grad()
def generate(
    model: nn.Module,
    num_samples: int,
    settings: SamplingSettings = SamplingSettings(),
    *,
    scheduler=None,
    classes: Sequence[int] | None = None,
    init_noise: np.ndarray | None = None,
    vae: nn.Module | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    indices: Sequence[int] | None = None,
    progress: bool = True,
    step_callback: StepCallback | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num_samples`` images; returns ``(uint8 NHWC images, int64 labels)``.

    ``classes`` are cycled over the samples (random labels from each sample's stream when
    ``None``); ``init_noise`` (float32 N×C×H×W) replaces the drawn x_T; ``indices`` selects
    which sample indices of the run to generate (default all). Pixel-space models
    (``vae is None``) clip x0 to [-1, 1] unless ``settings.clip_denoised`` says otherwise;
    latent models do not clip, as the official sampler. ``scheduler`` (one of diffusers'
    schedulers) replaces the official sampler by ``DiTPipeline``'s loop
    (:func:`scheduler_loop`); ``settings.steps`` and ``cfg_scale`` still apply.
    """
    clip = settings.clip_denoised if settings.clip_denoised is not None else vae is None
    images, labels_out = [], []
    for _, labels, x0 in trajectories(
        model,
        num_samples,
        settings,
        scheduler=scheduler,
        classes=classes,
        init_noise=init_noise,
        clip_denoised=clip,
        batch_size=batch_size,
        device=device,
        indices=indices,
        progress=progress,
        step_callback=step_callback,
    ):
        if vae is not None:
            x0 = decode_latents(vae, x0)
        images.append(to_uint8(x0))
        labels_out.append(labels.cpu().numpy().astype(np.int64))
    return np.concatenate(images), np.concatenate(labels_out)
