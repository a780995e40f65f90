"""PTQ methods: one module each (a configuration dataclass and the :class:`Method` entry
with what it contributes to the pipeline)."""

from ditq.methods.ditas import DITAS, DiTASConfig
from ditq.methods.gptq import GPTQ, GPTQConfig
from ditq.methods.ptq4dit import PTQ4DIT, PTQ4DiTConfig
from ditq.methods.rtn import RTN, RTNConfig
from ditq.methods.single_step import SINGLE_STEP, SingleStepConfig
from ditq.methods.smoothquant import SMOOTHQUANT, SmoothQuantConfig
from ditq.methods.svdquant import SVDQUANT, SVDQuantConfig
from ditq.pipeline.method import Method

METHODS: dict[str, Method] = {
    method.name: method
    for method in (RTN, SMOOTHQUANT, SINGLE_STEP, PTQ4DIT, DITAS, GPTQ, SVDQUANT)
}

__all__ = [
    "METHODS",
    "DiTASConfig",
    "GPTQConfig",
    "Method",
    "PTQ4DiTConfig",
    "RTNConfig",
    "SingleStepConfig",
    "SVDQuantConfig",
    "SmoothQuantConfig",
]
