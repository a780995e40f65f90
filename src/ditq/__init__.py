"""ditq: post-training quantization of Diffusion Transformers."""

__version__ = "0.1.0"

from ditq.models import load_model  # noqa: E402

__all__ = ["__version__", "load_model"]
