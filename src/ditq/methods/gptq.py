"""GPTQ (Frantar et al., ICLR 2023; METHODS.md "Beyond the seeds") on DiTs, as Q-DiT uses
it: 4-bit weights in groups of 128 input channels, rounded by GPTQ block by block with
inputs from the blocks already quantized (:mod:`ditq.pipeline.gptq_solver`); activations
as configured (static per tensor by default, ``--a-dynamic --a-granularity token`` for
Q-DiT's per-token ranges). Every other method takes the same solver with
``--weight-solver gptq``."""

from __future__ import annotations

from dataclasses import dataclass

from ditq.errors import DitqError
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.method import Method


@dataclass
class GPTQConfig(QuantConfig):
    """W4A8, weights asymmetric min/max in groups of 128, solved by GPTQ (damp 0.01,
    act-order with static groups, 128-column lazy batches)."""

    wbits: int = 4
    abits: int = 8
    w_granularity: str = "group"
    w_group_size: int = 128
    weight_solver: str = "gptq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_solver != "gptq":
            raise DitqError("--method gptq solves weights with GPTQ; for RTN use --method rtn")


GPTQ = Method(
    "gptq",
    GPTQConfig,
    summary="GPTQ weight rounding block by block (Hessians of the quantized model's inputs)",
)
