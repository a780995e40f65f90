"""Round-to-nearest (RTN): min/max ranges, no transformation. The baseline of every table."""

from __future__ import annotations

from dataclasses import dataclass

from ditq.pipeline.config import QuantConfig
from ditq.pipeline.method import Method


@dataclass
class RTNConfig(QuantConfig):
    """Round to nearest with min/max weight and activation ranges."""


RTN = Method("rtn", RTNConfig, summary="round to nearest, min/max ranges")
"""Wrap, weight ranges, static activation ranges on every entry of the calibration set:
the pipeline's steps with nothing in between."""
