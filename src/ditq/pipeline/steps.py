"""The quantization entry point: wrap the selected layers, calibrate, pack.

Every method runs the same steps, adding its own transformation in between::

    layers = wrap_layers(model, config)          # QuantLinear everywhere selected
    ... method: smoothing / low-rank / reconstruction on the float weights ...
    calibrate_weights(model)                     # weight range search
    calibrate_activations(model, calib_set)      # static activation ranges (hooks)
    pack_model(model)                            # integer codes only

:func:`quantize_model` does all of it for methods without a transformation (RTN).
"""

from __future__ import annotations

from torch import nn
from tqdm.auto import tqdm

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import ATTENTION_POINTS, collect_input_stats
from ditq.errors import DitqError
from ditq.models.dit import DiT
from ditq.quant.config import QuantConfig
from ditq.quant.layers import QuantLinear
from ditq.quant.observer import observer_for, range_from_observer
from ditq.quant.quantizer import Quantizer

MATMUL_INPUTS = tuple(point.rsplit(".", 1)[-1] for point in ATTENTION_POINTS)
"""Attribute names of the attention matmul quantizers on ``Attention`` (q, k, v, softmax)."""


def layers_to_wrap(model: DiT, config: QuantConfig) -> dict[str, nn.Linear]:
    """The float linears ``config`` quantizes, checked against their shapes (group sizes,
    packed 4-bit codes) so that a configuration that cannot work fails before any work."""
    found = {}
    for name in config.layers.names(model):
        if config.keeps_float(name):
            continue
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise DitqError(
                f"{name} is a {type(module).__name__}; ditq quantizes linear layers only "
                f"(leave it out of the layer selection)"
            )
        config.weight_spec(name).check_weight_shape(
            module.out_features, module.in_features, layer=name
        )
        found[name] = module
    return found


def wrap_layers(model: DiT, config: QuantConfig) -> dict[str, QuantLinear]:
    """Replace the selected linears of ``model`` (in place) by uncalibrated ``QuantLinear``
    and install the attention matmul quantizers when ``config.attn_bits < 16``."""
    wrapped = {}
    for name, module in layers_to_wrap(model, config).items():
        layer = QuantLinear.from_linear(module, config.weight_spec(name), config.act_spec(name))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        wrapped[name] = layer
    attention = config.attention_spec()
    if attention.enabled:
        for block in model.blocks:
            for point in MATMUL_INPUTS:
                setattr(block.attn, point, Quantizer(attention).to(block.attn.qkv.weight.device))
            block.attn.explicit_matmuls = True
    return wrapped


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def activation_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every activation quantizer: layer inputs and attention matmul inputs, by module name."""
    found = {f"{n}.act_quantizer": m.act_quantizer for n, m in quantized_layers(model).items()}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and name.rsplit(".", 1)[-1] in MATMUL_INPUTS:
            found[name] = module
    return found


def calibrate_weights(model: nn.Module, progress: bool = False) -> None:
    """Range search of every quantized weight (the spec's min/max, percentile or MSE), with
    a bar naming the current layer when ``progress``."""
    layers = {n: q for n, q in quantized_layers(model).items() if not q.packed}
    bar = tqdm(layers.items(), desc="weight ranges", unit="layer", disable=not progress)
    for name, layer in bar:
        bar.set_postfix_str(name, refresh=False)
        layer.calibrate_weight()


def set_activation_bypass(model: nn.Module, bypass: bool) -> None:
    for quantizer in activation_quantizers(model).values():
        quantizer.bypass = bypass


def calibrate_activations(
    model: DiT,
    calib: CalibrationSet,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Static activation ranges from the calibration set (all of its entries).

    Statistics are collected with activation quantization bypassed (weights quantized), one
    observer per static quantizer fed with exactly the tensor it will quantize. Returns
    the calibrated range per quantizer, for the calibration report.
    """
    static = {n: q for n, q in activation_quantizers(model).items() if q.spec.needs_calibration}
    if not static:
        return {}
    set_activation_bypass(model, True)
    try:
        observers = collect_input_stats(
            model,
            calib,
            lambda name: observer_for(static[name].spec),
            list(static),
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
    finally:
        set_activation_bypass(model, False)
    ranges = {}
    bar = tqdm(static.items(), desc="activation ranges", unit="tensor", disable=not progress)
    for name, quantizer in bar:
        bar.set_postfix_str(name, refresh=False)
        x_min, x_max = range_from_observer(observers[name], quantizer.spec)
        quantizer.set_range(x_min, x_max)
        ranges[name] = {"min": float(x_min.min()), "max": float(x_max.max())}
    return ranges


def pack_model(model: nn.Module) -> None:
    """Keep only integer weight codes in every quantized layer (outputs unchanged)."""
    for layer in quantized_layers(model).values():
        layer.pack()


def quantize_model(
    model: DiT,
    config: QuantConfig,
    calib: CalibrationSet | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Round-to-nearest quantization of ``model`` in place: wrap, calibrate weights and
    (static) activations on ``calib``. Returns the activation ranges."""
    wrap_layers(model, config)
    calibrate_weights(model, progress)
    needs_data = any(q.spec.needs_calibration for q in activation_quantizers(model).values())
    if needs_data and calib is None:
        raise DitqError(
            "static activation ranges need a calibration set; pass one, or use dynamic "
            "activations (--a-dynamic)"
        )
    return calibrate_activations(model, calib, batch_size, device, progress) if needs_data else {}
