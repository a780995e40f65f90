"""DiT models: the official architecture, checkpoint loading, official downloads, the VAE."""

from ditq.models.adapter import ModelAdapter, adapter_for
from ditq.models.diffusers_dit import DiffusersDiT, DiffusersDiTAdapter
from ditq.models.diffusers_pixart import DiffusersPixArt, DiffusersPixArtAdapter
from ditq.models.dit import ARCHITECTURES, DiT, DiTConfig, config_for
from ditq.models.dit_adapter import DiTAdapter
from ditq.models.loading import infer_config, load_checkpoint, read_state_dict

__all__ = [
    "ARCHITECTURES",
    "DiT",
    "DiTAdapter",
    "DiffusersDiT",
    "DiffusersDiTAdapter",
    "DiffusersPixArt",
    "DiffusersPixArtAdapter",
    "DiTConfig",
    "ModelAdapter",
    "adapter_for",
    "config_for",
    "infer_config",
    "load_checkpoint",
    "read_state_dict",
]
