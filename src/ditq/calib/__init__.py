"""Calibration sets recorded from FP sampling trajectories, and the statistics hooks that
every PTQ method runs over them (METHODS.md)."""

from ditq.calib.dataset import (
    CalibrationSet,
    build_calibration_set,
    num_sampling_steps,
    select_steps,
)
from ditq.calib.hooks import (
    BlockIO,
    Observer,
    ObserverFactory,
    attention_point_names,
    capture_block_io,
    capture_inputs,
    capture_layer_inputs,
    collect_input_stats,
    explicit_attention,
    get_layer,
)

__all__ = [
    "BlockIO",
    "CalibrationSet",
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
    "num_sampling_steps",
    "select_steps",
]
