"""The three calls of ditq's Python API::

    model = ditq.load_model("DiT-XL-2-256")                 # or a file, or "demo"
    model = ditq.quantize(model, PTQ4DiTConfig(wbits=4))     # the method's published recipe
    ditq.save(model, "runs/w4a8")                            # a quantized directory
    model = ditq.load_model("runs/w4a8", backend="cuda")     # real low-bit kernels

:func:`quantize` runs the pipeline (:mod:`ditq.pipeline.run`) with the method that owns the
configuration's class; :func:`load_model` is the one place where the execution backend of a
quantized model is chosen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq.calib.dataset import CalibrationSet
from ditq.errors import DitqError
from ditq.kernels import apply_backend, resolve_backend
from ditq.methods import METHODS
from ditq.models.diffusers_dit import is_diffusers_dit, load_diffusers_dit
from ditq.models.diffusers_pixart import load_pixart, pixart_pipeline_dir
from ditq.models.loading import load_checkpoint, resolve_dtype
from ditq.pipeline.checkpoint import is_quantized_dir, load_quantized, save_quantized
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.method import Method, RunContext
from ditq.pipeline.run import quantize_with, record_of


def method_for(config: QuantConfig) -> Method:
    """The method whose configuration class ``config`` is."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    names = ", ".join(m.config_class.__name__ for m in METHODS.values())
    raise DitqError(f"{type(config).__name__} is no method's configuration; use one of {names}")


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: CalibrationSet | None = None,
    *,
    batch_size: int = 64,
    progress: bool = True,
    calibration: dict[str, Any] | None = None,
    calib_seconds: float = 0.0,
    command: str = "",
    resume_dir: str | Path | None = None,
) -> nn.Module:
    """Quantize ``model`` in place with the method of ``config`` and return it, packed and
    ready to run (simulated low-bit execution; :func:`save` then :func:`load_model` with
    ``backend="cuda"`` for the real kernels).

    ``calib``: the calibration set; ``None`` records the method's published one from the
    model's own sampling (``Method.default_calib``) when the method needs one.
    ``calibration``/``calib_seconds``/``command``: how ``calib`` was made, recorded in the
    quantized directory's manifest and report. ``resume_dir``: where the sequential driver
    saves each finished block, so that the same call resumes after an interruption (with
    the same calibration set: save it, or pass the same seeds on the same machine).
    """
    method = method_for(config)
    device = str(next(model.parameters()).device)
    if calib is None and method.needs_calibration(config):
        start = time.perf_counter()
        settings = method.default_calib
        calib = settings.build(model, batch_size=batch_size, device=device, progress=progress)
        calib_seconds = time.perf_counter() - start
        calibration = {**calib.meta, "settings": settings.to_dict()}
    ctx = RunContext(
        device=device,
        batch_size=batch_size,
        progress=progress,
        resume_dir=None if resume_dir is None else str(resume_dir),
    )
    return quantize_with(
        model,
        method,
        config,
        calib,
        ctx,
        calibration=calibration,
        calib_seconds=calib_seconds,
        command=command,
    )


def save(model: nn.Module, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the quantized ``model`` to the directory ``out`` (atomically; an existing
    quantized directory is replaced only with ``overwrite``)."""
    record = record_of(model)
    return save_quantized(
        model,
        out,
        record.method,
        record.config,
        record.calibration,
        record.report,
        overwrite=overwrite,
    )


def load_model(
    path_or_name: str | Path,
    *,
    backend: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    prompts: list[str] | None = None,
    **checkpoint_options: Any,
) -> nn.Module:
    """A model ready to run: a quantized directory written by :func:`save` or ``ditq
    quantize``; a diffusers ``DiTTransformer2DModel`` (a model directory, a pipeline
    directory, or a hub id such as ``facebook/DiT-XL-2-256`` when the network allows); a
    PixArt pipeline directory, conditioned on ``prompts`` (a built-in list otherwise: the
    text encoder runs once here, :mod:`ditq.models.diffusers_pixart`); or a
    full-precision checkpoint in the official layout (a file, an official name such as
    ``DiT-XL-2-256``, or a bundled model such as ``demo``; ``checkpoint_options`` as
    :func:`ditq.models.loading.load_checkpoint`).

    ``backend`` (``simulated`` or ``cuda``; default ``cuda`` for a quantized directory on
    a CUDA device) picks how a quantized model executes (:mod:`ditq.kernels`); a
    full-precision model ignores it. Returns the model in eval mode on ``device``.
    """
    name = str(path_or_name)
    quantized = is_quantized_dir(name)
    backend = resolve_backend(backend, device, quantized=quantized)
    if quantized:
        model = load_quantized(name, device=device, dtype=resolve_dtype(dtype))
        return apply_backend(model, backend)
    if pixart_pipeline_dir(name) is not None:
        return load_pixart(name, prompts).to(device=device, dtype=resolve_dtype(dtype)).eval()
    if prompts is not None:
        raise DitqError(
            f"prompts condition text-to-image models (a PixArt pipeline directory); {name} "
            "takes class labels"
        )
    if is_diffusers_dit(name) is not None or _looks_like_hub_id(name):
        return load_diffusers_dit(name).to(device=device, dtype=resolve_dtype(dtype)).eval()
    if Path(name).is_dir():
        raise DitqError(
            f"{name} is a directory but neither one written by ditq quantize nor a diffusers "
            "DiT model or pipeline directory"
        )
    return load_checkpoint(name, device=device, dtype=dtype, **checkpoint_options)


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that is no local path (diffusers may download it)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()
