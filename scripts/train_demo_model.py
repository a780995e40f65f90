"""Train the small DiT bundled with ditq (``ditq demo``, ``load_model("demo")``) on CIFAR-10.

    python scripts/train_demo_model.py --data ../shared/data/cifar_train.npz \
        --out src/ditq/assets/dit_demo_cifar10.safetensors --minutes 8

The recipe is the official DiT's (AdamW, no weight decay, hybrid loss with learned
variance, uniform timesteps of a 1000-step linear schedule, label dropout 0.1 for guidance,
EMA weights saved) scaled to a short run: a 8-block, 256-wide DiT with 4×4 patches (64
tokens, 9.8M parameters) so that sampling it on a laptop CPU takes seconds, a larger
learning rate with warm-up, and a faster EMA. Training is bounded by wall time
(``--minutes``) or step count. The EMA weights are written in bf16 (under 20 MB) as
safetensors whose metadata holds the architecture and these training settings.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ditq.diffusion.gaussian import GaussianDiffusion, get_named_beta_schedule
from ditq.diffusion.training import training_losses
from ditq.eval.images import load_images
from ditq.io import atomic_path
from ditq.models.dit import DiT, DiTConfig
from ditq.models.loading import CONFIG_METADATA_KEY

TRAINING_METADATA_KEY = "ditq.training"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 npz (JPEG blob layout, with labels)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=1000)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--minutes", type=float, default=8.0, help="wall-time budget of the loop")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-every", type=int, default=500)
    return p.parse_args(argv)


def load_cifar(path: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images as uint8 NCHW and labels as int64, on ``device``."""
    images = torch.from_numpy(load_images(path)).permute(0, 3, 1, 2).contiguous()
    with np.load(path) as archive:
        labels = torch.from_numpy(archive["labels"].astype(np.int64))
    return images.to(device), labels.to(device)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = args.device
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    images, labels = load_cifar(args.data, device)
    config = DiTConfig(
        depth=args.depth,
        hidden_size=args.hidden_size,
        patch_size=args.patch_size,
        num_heads=args.num_heads,
        input_size=images.shape[-1],
        in_channels=images.shape[1],
        num_classes=int(labels.max()) + 1,
    )
    model = DiT(config).to(device).train()
    ema = DiT(config).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 1000), learn_sigma=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(args.warmup_steps, 1))
    )
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"DiT depth {config.depth} width {config.hidden_size} patch {config.patch_size}: "
        f"{params / 1e6:.2f}M parameters, {len(images)} images on {device}",
        flush=True,
    )

    start, step, running = time.perf_counter(), 0, []
    deadline = start + 60 * args.minutes
    while time.perf_counter() < deadline and (args.max_steps is None or step < args.max_steps):
        index = torch.randint(
            0, len(images), (args.batch_size,), device=device, generator=generator
        )
        x0 = to_model_range(images[index])
        flip = torch.rand(args.batch_size, device=device, generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(
            0, diffusion.num_timesteps, (args.batch_size,), device=device, generator=generator
        )
        noise = torch.randn(x0.shape, device=device, generator=generator)
        x_t = diffusion.q_sample(x0, t, noise)
        with autocast:
            output = forward(x_t, t, labels[index])
        loss = training_losses(diffusion, output.float(), x0, x_t, t, noise)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        running.append(loss.detach())
        step += 1
        if step % args.log_every == 0:
            mean = torch.stack(running).mean().item()
            running.clear()
            if not math.isfinite(mean):
                raise RuntimeError(f"loss is {mean} at step {step}")
            print(
                f"step {step:6d}  loss {mean:.4f}  {time.perf_counter() - start:6.0f} s", flush=True
            )
    seconds = time.perf_counter() - start
    settings = {
        "data": Path(args.data).name,
        "steps": step,
        "batch_size": args.batch_size,
        "images_seen": step * args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "ema_decay": args.ema_decay,
        "seed": args.seed,
        "train_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "parameters": params,
    }
    save(ema, args.out, settings)
    print(f"{step} steps in {seconds:.0f} s -> {args.out}", flush=True)
    return settings


def save(model: DiT, out: str, settings: dict) -> None:
    """EMA weights in bf16 with the architecture and training settings as metadata."""
    from safetensors.torch import save_file

    tensors = {
        k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()
    }
    metadata = {
        CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()),
        TRAINING_METADATA_KEY: json.dumps(settings),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


if __name__ == "__main__":
    train(parse_args())
