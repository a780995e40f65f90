"""Loading DiT checkpoints: official files, training checkpoints, safetensors, official names.

Architecture flags that are not given are inferred from the state dict's shapes; flags
that are given and disagree with the file produce one error naming the offending keys and
the configuration that would fit.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch

from ditq.errors import DitqError
from ditq.io import read_safetensors, unreadable_safetensors
from ditq.models.dit import ARCHITECTURES, DiT, DiTConfig, config_for
from ditq.models.hub import OFFICIAL_CHECKPOINTS, Opener, fetch_official

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_METADATA_KEY = "ditq.model_config"
"""safetensors metadata entry holding the JSON ``DiTConfig`` of the weights (optional)."""
BUNDLED_MODELS = {"demo": "dit_demo_cifar10.safetensors"}
"""Models shipped inside the package (``ditq/assets``), loadable by name without a download:
``demo`` is a small class-conditional DiT trained on CIFAR-10 by
``scripts/train_demo_model.py``."""


def bundled_model_path(name: str) -> Path:
    """The file of a bundled model (``BUNDLED_MODELS``)."""
    path = Path(str(resources.files("ditq") / "assets" / BUNDLED_MODELS[name]))
    if not path.is_file():
        raise DitqError(
            f"the bundled model {name!r} is missing from this installation ({path}); "
            f"reinstall ditq or train it with scripts/train_demo_model.py"
        )
    return path


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"bf16"``/``"fp16"`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DitqError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a plain state dict, a training checkpoint (``ema`` preferred, then
    ``model``) or a ``.safetensors`` file, on the CPU in their stored dtype."""
    path = Path(path)
    if not path.is_file():
        raise DitqError(
            f"checkpoint {str(path)!r} does not exist; pass a file path or one of the "
            f"official names {', '.join(OFFICIAL_CHECKPOINTS)}"
        )
    if path.suffix == ".safetensors":
        return read_safetensors(path, DAMAGED_CHECKPOINT_FIX)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise DitqError(
            f"{path} is not a checkpoint ditq can read ({type(err).__name__}): expected a "
            "state dict of tensors or a training checkpoint saved with torch.save (e.g. "
            "torch.save(model.state_dict(), path)), or a .safetensors file"
        ) from err
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DitqError(
            f"{path} holds no state dict (expected a dict of tensors, or a training "
            f"checkpoint with an 'ema' or 'model' entry)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


DAMAGED_CHECKPOINT_FIX = "it may be truncated or not a safetensors file: download or write it again"


def stored_config(path: str | Path) -> DiTConfig | None:
    """The ``DiTConfig`` saved in a safetensors file's metadata, if any."""
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
    except (SafetensorError, OSError) as err:
        raise unreadable_safetensors(path, err, DAMAGED_CHECKPOINT_FIX) from err
    if text is None:
        return None
    try:
        return DiTConfig(**json.loads(text))
    except (TypeError, ValueError) as err:
        raise DitqError(
            f"{path}: its {CONFIG_METADATA_KEY} metadata is not a DiT configuration ({err})"
        ) from err


def infer_config(state_dict: dict[str, torch.Tensor]) -> DiTConfig:
    """The :class:`DiTConfig` whose parameter shapes match ``state_dict``.

    The head count leaves no trace in the shapes: it is taken from the official
    configuration with the same depth and width, else ``hidden_size / 64`` (the head width
    of every official configuration).
    """
    required = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise DitqError(
            f"the checkpoint is not a DiT state dict: missing {', '.join(missing)} "
            f"(keys found start with {', '.join(sorted(state_dict)[:3])})"
        )
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    num_patches = state_dict["pos_embed"].shape[1]
    depth = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))),
        default=-1,
    )
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    table = state_dict.get("y_embedder.embedding_table.weight")
    mlp_rows = state_dict.get("blocks.0.mlp.fc1.weight")
    heads = next(
        (
            shape["num_heads"]
            for shape in ARCHITECTURES.values()
            if (shape["depth"], shape["hidden_size"]) == (depth, hidden)
        ),
        max(1, hidden // 64),
    )
    return DiTConfig(
        depth=depth,
        hidden_size=hidden,
        patch_size=patch,
        num_heads=heads,
        input_size=int(round(num_patches**0.5)) * patch,
        in_channels=in_channels,
        num_classes=(table.shape[0] - 1) if table is not None else 1000,
        learn_sigma=out_features == patch * patch * in_channels * 2,
        mlp_ratio=(mlp_rows.shape[0] / hidden) if mlp_rows is not None else 4.0,
    )


def build_config(
    state_dict: dict[str, torch.Tensor] | None = None,
    arch: str | None = None,
    **overrides,
) -> DiTConfig:
    """Explicit flags over the named architecture over what the state dict implies."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if state_dict is not None:
        config = infer_config(state_dict)
        if arch is not None:
            named = config_for(arch)
            shape = {
                k: getattr(named, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")
            }
            config = replace(config, **shape)
        return replace(config, **overrides)
    if arch is None:
        raise DitqError("no checkpoint to infer the architecture from: pass --arch, e.g. DiT-S/2")
    return config_for(arch, **overrides)


def _shape_mismatches(model: DiT, state_dict: dict[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems += [f"{k}: missing from the checkpoint" for k in expected if k not in state_dict]
    problems += [f"{k}: not a DiT parameter" for k in state_dict if k not in expected]
    return problems


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor], config: DiTConfig, source: str = "checkpoint"
) -> DiT:
    """Build ``DiT(config)`` and load ``state_dict`` strictly, with one clear error on mismatch."""
    with torch.device("meta"):
        model = DiT(config)
    problems = _shape_mismatches(model, state_dict)
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        )
        try:
            fits = infer_config(state_dict)
            hint = (
                f" The checkpoint fits {fits.arch or 'a custom DiT'} with input_size="
                f"{fits.input_size}, in_channels={fits.in_channels}, "
                f"num_classes={fits.num_classes}, learn_sigma={fits.learn_sigma}: "
                f"drop the conflicting flags or pass these."
            )
        except DitqError:
            hint = ""
        raise DitqError(f"{source} does not match the requested architecture: {shown}.{hint}")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
    return model


def load_checkpoint(
    path_or_name: str | Path,
    *,
    arch: str | None = None,
    input_size: int | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
    learn_sigma: bool | None = None,
    num_heads: int | None = None,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    opener: Opener | None = None,
    progress: bool = True,
) -> DiT:
    """Load a full-precision DiT from a checkpoint file, an official name
    (``DiT-XL-2-256``/``-512``) or a bundled model (``demo``).

    Architecture flags override the configuration stored in the file's metadata, which
    overrides what the file's shapes imply. Returns the model in eval
    mode, on ``device``, in ``dtype`` (fp32 unless asked).
    """
    name = str(path_or_name)
    if Path(name).is_dir():
        raise DitqError(
            f"{name} is a directory; a full-precision checkpoint is a file (quantized "
            "directories load with ditq.load_model)"
        )
    if name in OFFICIAL_CHECKPOINTS:
        entry = OFFICIAL_CHECKPOINTS[name]
        path = fetch_official(name, opener=opener, progress=progress)
        arch = arch or entry.arch
        input_size = input_size or entry.input_size
    elif name in BUNDLED_MODELS:
        path = bundled_model_path(name)
    else:
        path = Path(name)
    state_dict = read_state_dict(path)
    stored = stored_config(path) if path.is_file() else None
    if stored is not None and arch is None:
        num_heads = num_heads or stored.num_heads
    config = build_config(
        state_dict,
        arch=arch,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        num_heads=num_heads,
    )
    model = model_from_state_dict(state_dict, config, source=str(path))
    return model.to(device=device, dtype=resolve_dtype(dtype)).eval()
