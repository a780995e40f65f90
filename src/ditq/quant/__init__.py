"""Quantizer primitives: specs, fake quantization, range search, observers, code storage.

See METHODS.md, "Uniform quantizers", and the docstring of ``ditq.quant.quantizer`` for
the shapes of scales and zero points per granularity.
"""

from ditq.quant.observer import (
    ChannelAbsMaxObserver,
    MinMaxObserver,
    SampleObserver,
    observer_for,
    range_from_observer,
)
from ditq.quant.packing import (
    code_dtype,
    pack_codes,
    pack_int4,
    storage_dtype_for,
    unpack_codes,
    unpack_int4,
)
from ditq.quant.quantizer import (
    FP8_E4M3_MAX,
    MIN_SCALE,
    MSE_MIN_RATIO,
    Quantizer,
    compute_fp8_scale,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_fp8,
    find_range,
    from_range_groups,
    qparams_from_range,
    quantize,
    quantize_fp8,
    to_range_groups,
)
from ditq.quant.spec import (
    Granularity,
    PerChannel,
    PerColumnGroup,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    integer_range,
)

__all__ = [
    "FP8_E4M3_MAX",
    "MIN_SCALE",
    "MSE_MIN_RATIO",
    "ChannelAbsMaxObserver",
    "Granularity",
    "MinMaxObserver",
    "PerChannel",
    "PerColumnGroup",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QuantSpec",
    "Quantizer",
    "SampleObserver",
    "code_dtype",
    "compute_fp8_scale",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_fp8",
    "find_range",
    "from_range_groups",
    "integer_range",
    "observer_for",
    "pack_codes",
    "pack_int4",
    "qparams_from_range",
    "quantize",
    "quantize_fp8",
    "range_from_observer",
    "storage_dtype_for",
    "to_range_groups",
    "unpack_codes",
    "unpack_int4",
]
