"""ditq: post-training quantization of Diffusion Transformers.

``ditq.load_model``, ``ditq.quantize`` and ``ditq.save`` are the Python API
(:mod:`ditq.api`); the method configurations are in :mod:`ditq.methods`.
"""

import os

from ditq.version import __version__

OPENMP_SPIN_COUNT = "10000"
"""How long idle OpenMP threads of PyTorch's CPU kernels spin before they sleep, unless the
user set ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``. libgomp's default spins so long that
two PyTorch processes on the same cores (a demo beside a test run, two jobs on a laptop)
slow each other down by an order of magnitude while both spin; this count keeps the idle
speed and gives the cores back quickly under contention (benchmarks/RESULTS.md, "CPU
contention"). It must be set before PyTorch loads its OpenMP runtime: it has no effect
when torch was imported before ditq."""
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT

from ditq.api import load_model, quantize, save  # noqa: E402

__all__ = ["__version__", "load_model", "quantize", "save"]
