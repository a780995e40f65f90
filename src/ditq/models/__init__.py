"""DiT models: the official architecture, checkpoint loading, official downloads, the VAE."""

from ditq.models.dit import ARCHITECTURES, DiT, DiTConfig, config_for
from ditq.models.loading import infer_config, load_model, read_state_dict

__all__ = [
    "ARCHITECTURES",
    "DiT",
    "DiTConfig",
    "config_for",
    "infer_config",
    "load_model",
    "read_state_dict",
]
