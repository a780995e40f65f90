"""The steps every quantization runs, in the order :func:`ditq.pipeline.run.run_method`
enforces::

    layers = wrap_layers(model, config)          # QuantLinear everywhere selected
    ... method: smoothing / low-rank on the float weights ...
    calibrate_weights(model)                     # weight range search
    calibrate_activations(model, calib_set)      # static activation ranges (hooks)
    ... solver: sequential reconstruction ...
    pack_model(model)                            # integer codes only
"""

from __future__ import annotations

from torch import nn
from tqdm.auto import tqdm

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import collect_input_stats
from ditq.errors import DitqError
from ditq.models.adapter import MATMUL_POINTS, adapter_for
from ditq.pipeline.config import QuantConfig
from ditq.quant.layers import QuantLinear
from ditq.quant.observer import observer_for, range_from_observer
from ditq.quant.quantizer import Quantizer


def layers_to_wrap(model: nn.Module, config: QuantConfig) -> dict[str, nn.Linear]:
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
        act = config.act_spec(name)
        if act.enabled:
            act.check_divides(module.in_features, layer=name, tensor="activation")
        found[name] = module
    return found


def quantized_role_groups(
    model: nn.Module, config: QuantConfig, roles: tuple[str, ...]
) -> list[tuple[str, ...]]:
    """The block linears of ``roles`` that ``config`` quantizes, by role and block (the
    linears of a group share one input; a group with a layer kept in float, or left out of
    the layer selection, is left out)."""
    quantized = layers_to_wrap(model, config)
    groups = adapter_for(model).role_groups(roles)
    return [group for group in groups if all(name in quantized for name in group)]


def wrap_layers(model: nn.Module, config: QuantConfig) -> dict[str, QuantLinear]:
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
        device = next(model.parameters()).device
        for attn in adapter_for(model).attention_modules().values():
            for point in MATMUL_POINTS:
                setattr(attn, point, Quantizer(attention).to(device))
            attn.explicit_matmuls = True
    return wrapped


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def activation_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every activation quantizer: layer inputs and attention matmul inputs, by module name."""
    found = {f"{n}.act_quantizer": m.act_quantizer for n, m in quantized_layers(model).items()}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and name.rsplit(".", 1)[-1] in MATMUL_POINTS:
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
    model: nn.Module,
    calib: CalibrationSet,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Static activation ranges from the calibration set (all of its entries).

    Statistics are collected with activation quantization bypassed (weights quantized), one
    observer per static quantizer fed with exactly the tensor it will quantize (``minmax``
    exactly; percentile and ``mse`` ranges on a uniform sample of at most 1,000,000 values,
    ``observer_for``). Returns the calibrated range per quantizer, for the
    calibration report.
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
