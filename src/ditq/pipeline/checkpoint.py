"""The quantized-model directory: what ``ditq quantize --out DIR`` writes.

``DIR/model.safetensors``
    Every tensor of the packed model. A quantized linear ``L`` stores
    ``L.weight_codes`` (int8 / uint8; two 4-bit codes per byte, low nibble first, along the
    input dimension; ``float8_e4m3fn`` for FP8), ``L.weight_quantizer.scale`` and
    ``.zero_point`` (float32; shapes per granularity: (C_out, 1) per channel,
    (C_out, C_in/g, 1) per group), ``L.bias``, static activation ranges
    ``L.act_quantizer.scale`` / ``.zero_point`` ((1, 1)), and optionally
    ``L.input_scale`` (C_in,), the signs of an online Hadamard rotation
    ``L.rotation_signs`` (C_in,) and the 16-bit low-rank branch ``L.lowrank_up`` (C_out, r) /
    ``L.lowrank_down`` (r, C_in). Buffers a module does not keep in its state dict
    (non-persistent, e.g. diffusers' position embeddings) are stored too and listed in the
    manifest's ``buffers``. Attention matmul quantizers are
    ``blocks.i.attn.{q,k,v,attn}_act.scale``/``.zero_point``. All other parameters are
    the (possibly re-parameterized) float32 tensors of the official layout.
``DIR/ditq.json``
    ``format``, ``format_version``, ``ditq_version``, the model family (its adapter's
    name; ``dit`` when absent) and architecture, the method and its
    full configuration, the per-layer quantization specs, the calibration settings and
    the sampling settings the model was calibrated for.
``DIR/calibration_report.json``
    Wall times, per-layer statistics, method details (e.g. chosen alphas).

Everything is written to a temporary directory beside ``DIR`` and renamed at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ditq.errors import DitqError
from ditq.io import OutputKind, read_json_object, read_safetensors, write_output
from ditq.models.adapter import MATMUL_POINTS, adapter_class, adapter_for
from ditq.pipeline.steps import quantized_layers
from ditq.quant.layers import QuantLinear
from ditq.quant.quantizer import Quantizer
from ditq.quant.spec import QuantSpec
from ditq.version import __version__

FORMAT = "ditq-quantized"
FORMAT_VERSION = 1
MANIFEST = "ditq.json"
WEIGHTS = "model.safetensors"
REPORT = "calibration_report.json"


def is_quantized_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a manifest written by :func:`save_quantized` (any version)."""
    manifest = read_json_object(Path(path) / MANIFEST)
    return manifest is not None and manifest.get("format") == FORMAT


QUANTIZED_DIR = OutputKind("ditq quantized directory", True, is_quantized_dir)


def layer_manifest(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized layer: weight and activation specs, online scale and rotation,
    low-rank rank."""
    return {
        name: {
            "weight": layer.weight_quantizer.spec.to_dict(),
            "act": layer.act_quantizer.spec.to_dict(),
            "input_scale": layer.input_scale is not None,
            "rotation": layer.rotation_signs is not None,
            "lowrank_rank": layer.lowrank_rank,
        }
        for name, layer in quantized_layers(model).items()
    }


def attention_manifest(model: nn.Module) -> dict[str, Any] | None:
    """The spec of the attention matmul quantizers (one for all), None when in float."""
    for attn in adapter_for(model).attention_modules().values():
        point = getattr(attn, MATMUL_POINTS[0])
        return point.spec.to_dict() if isinstance(point, Quantizer) else None
    return None


def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    method: str,
    method_config: dict[str, Any],
    calibration: dict[str, Any],
    report: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (packed) with its manifest and report to ``out_dir`` atomically; an
    existing quantized directory is replaced only with ``overwrite``
    (:func:`ditq.io.check_output`)."""
    unpacked = [n for n, layer in quantized_layers(model).items() if not layer.packed]
    for name in unpacked:
        if model.get_submodule(name).weight_quantizer.spec.needs_calibration:
            raise DitqError(f"{name} is not packed: call pack_model(model) before saving")
    adapter = adapter_for(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ditq_version": __version__,
        "family": adapter.family,
        "architecture": adapter.architecture(),
        "method": method,
        "method_config": method_config,
        "layers": layer_manifest(model),
        "attention": attention_manifest(model),
        "calibration": calibration,
    }
    state = model.state_dict()
    buffers = {n: b for n, b in model.named_buffers() if n not in state}  # non-persistent
    if buffers:
        manifest["buffers"] = sorted(buffers)
    tensors = {k: v.detach().contiguous().cpu() for k, v in {**state, **buffers}.items()}
    with write_output(out_dir, QUANTIZED_DIR, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return Path(out_dir)


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DitqError(f"{path} is not a ditq quantized directory ({MANIFEST}: {err})") from err
    if manifest.get("format") != FORMAT:
        raise DitqError(f"{path / MANIFEST} is not a ditq quantized-model manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DitqError(
            f"{path} was written by ditq {manifest.get('ditq_version', '?')} in format "
            f"version {version}; this ditq ({__version__}) reads version {FORMAT_VERSION}. "
            f"Quantize the model again with this version, or install the one that wrote it"
        )
    return manifest


def load_quantized(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Rebuild a quantized model (simulated execution) from ``path`` without materializing
    float weights; :func:`ditq.load_model` picks the execution backend."""
    path = Path(path)
    manifest = read_manifest(path)
    family = adapter_class(manifest.get("family", "dit"))
    with torch.device("meta"):
        model = family.build(manifest["architecture"])
        for name, entry in manifest["layers"].items():
            old = model.get_submodule(name)
            layer = QuantLinear(
                old.in_features,
                old.out_features,
                old.bias is not None,
                QuantSpec.from_dict(entry["weight"]),
                QuantSpec.from_dict(entry["act"]),
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        if manifest.get("attention"):
            spec = QuantSpec.from_dict(manifest["attention"])
            for attn in adapter_for(model).attention_modules().values():
                for point in MATMUL_POINTS:
                    setattr(attn, point, Quantizer(spec))
                attn.explicit_matmuls = True
    tensors = _read_weights(path, device)
    try:
        for name, layer in quantized_layers(model).items():
            _prepare_layer_for_state(layer, name, tensors)
        for name in manifest.get("buffers", []):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, tensors.pop(name))
        model.load_state_dict(tensors, strict=True, assign=True)
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise DitqError(
            f"{path / WEIGHTS} does not match {path / MANIFEST} ({first}); the directory is "
            "damaged or was edited: quantize the model again"
        ) from err
    model.eval()
    cast_unquantized(model, dtype)
    return model


def _read_weights(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS
    if not weights.is_file():
        raise DitqError(
            f"{path} has a manifest but no {WEIGHTS}: the directory is incomplete; quantize "
            "the model again"
        )
    return read_safetensors(weights, "it may be truncated: quantize the model again", str(device))


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters of every module but the quantized layers and quantizers (whose
    codes and fp32 scales stay as they are) to ``dtype``."""
    for module in model.modules():
        if not isinstance(module, (QuantLinear, Quantizer)):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)


def _prepare_layer_for_state(layer: QuantLinear, name: str, tensors: dict) -> None:
    """Shape the layer's optional state like the stored tensors (packed codes, online
    scale, low-rank branch) so that a strict, assigning ``load_state_dict`` fits."""
    if f"{name}.weight_codes" in tensors:
        layer.weight = None
        layer.weight_codes = torch.empty_like(tensors[f"{name}.weight_codes"], device="meta")
    for buffer in ("input_scale", "rotation_signs"):
        if f"{name}.{buffer}" in tensors:
            setattr(layer, buffer, torch.empty_like(tensors[f"{name}.{buffer}"], device="meta"))
    if f"{name}.lowrank_up" in tensors:
        layer.set_lowrank(tensors[f"{name}.lowrank_up"], tensors[f"{name}.lowrank_down"])
