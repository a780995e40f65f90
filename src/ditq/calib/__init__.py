"""Calibration sets recorded from FP sampling trajectories, and the statistics hooks that
every PTQ method runs over them (METHODS.md)."""

from ditq.calib.dataset import (
    CalibrationSet,
    build_calibration_set,
    num_sampling_steps,
    select_steps,
)
from ditq.calib.hooks import (
    ATTENTION_POINTS,
    BLOCK_LINEARS,
    BlockIO,
    LayerSelection,
    Observer,
    ObserverFactory,
    attention_point_names,
    capture_block_io,
    capture_inputs,
    capture_layer_inputs,
    collect_input_stats,
    explicit_attention,
    get_layer,
    linear_layers,
)

__all__ = [
    "ATTENTION_POINTS",
    "BLOCK_LINEARS",
    "BlockIO",
    "CalibrationSet",
    "LayerSelection",
    "Observer",
    "ObserverFactory",
    "attention_point_names",
    "build_calibration_set",
    "capture_block_io",
    "capture_inputs",
    "capture_layer_inputs",
    "collect_input_stats",
    "explicit_attention",
    "get_layer",
    "linear_layers",
    "num_sampling_steps",
    "select_steps",
]
