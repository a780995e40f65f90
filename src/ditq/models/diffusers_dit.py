"""diffusers' ``DiTTransformer2DModel`` (the facebook/DiT-XL-2-256/512 checkpoints in
diffusers' layout) as a ditq model family: :class:`DiffusersDiT` and its adapter.

:class:`DiffusersDiT` holds the diffusers module as ``transformer`` and gives it the
official DiT's interface (``model(x, t, y)``, ``forward_with_cfg``, ``config`` as a
:class:`~ditq.models.dit.DiTConfig`), so that ditq's samplers, calibration sets and
methods run on it unchanged; ``model.transformer`` keeps diffusers' forward signature and
goes back into a ``DiTPipeline``. Two modules are swapped when it is built, both computing
the same function:

- the patch embedding's stride-p ``Conv2d`` becomes
  :class:`~ditq.models.diffusers_parts.PatchLinear` (a linear over flattened patches, so
  that it is quantized like any linear);
- every attention runs :class:`~ditq.models.diffusers_parts.QuantizableAttnProcessor`,
  which exposes the matmul hook points ``q_act``, ``k_act``, ``v_act``, ``attn_act``
  (identities unless quantized) and uses SDPA unless ``explicit_matmuls`` is set.

Structure for the adapter: per block ``norm1`` is adaLN-Zero with its own timestep and
class embedder (``norm1.emb``) and modulation linear ``norm1.linear`` (chunks shift_msa,
scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp); the attention has separate
``to_q``/``to_k``/``to_v`` (one role, one input) and ``to_out.0``; the MLP is
``ff.net.0.proj`` (GELU tanh) and ``ff.net.2``; the output modulation ``proj_out_1`` reads
block 0's conditioning and ``proj_out_2`` projects back to patches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ditq.errors import DitqError
from ditq.models.adapter import (
    AdaLNFold,
    InputFold,
    Unit,
    ValueRowsFold,
    register_adapter,
)
from ditq.models.diffusers_parts import PREFIX, DiffusersAdapter, dit_config, prepare_transformer
from ditq.models.dit import DiT

CLASS_NAME = "DiTTransformer2DModel"
BLOCK_LAYERS = {
    "qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "proj": ("attn1.to_out.0",),
    "fc1": ("ff.net.0.proj",),
    "fc2": ("ff.net.2",),
}
EMBEDDER_LAYERS = ("norm1.emb.timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2")
ADALN_LINEAR = "norm1.linear"
ADALN_CHUNKS = {"qkv": (0, 1), "fc1": (3, 4)}


class DiffusersDiT(nn.Module):
    """A ``DiTTransformer2DModel`` with the official DiT's interface (module docstring)."""

    forward_with_cfg = DiT.forward_with_cfg

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        prepare_transformer(transformer)
        self.transformer = transformer
        c = transformer.config
        self.config = dit_config(transformer, c.num_embeds_ada_norm)
        self.in_channels = c.in_channels
        self.num_classes = c.num_embeds_ada_norm

    @classmethod
    def from_config(cls, config: dict) -> DiffusersDiT:
        from diffusers import DiTTransformer2DModel

        return cls(DiTTransformer2DModel.from_config(config))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]


def is_diffusers_dit(path: str | Path) -> Path | None:
    """The directory holding a ``DiTTransformer2DModel`` (``path`` itself, or the
    ``transformer`` folder of a pipeline directory), or None."""
    import json

    for candidate in (Path(path), Path(path) / "transformer"):
        config = candidate / "config.json"
        if config.is_file():
            try:
                if json.loads(config.read_text()).get("_class_name") == CLASS_NAME:
                    return candidate
            except (OSError, ValueError):
                return None
    return None


def load_diffusers_dit(path: str | Path) -> DiffusersDiT:
    """A diffusers DiT from a model directory, a pipeline directory or a hub id."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as err:
        raise DitqError(
            "loading diffusers models needs diffusers: pip install 'ditq[diffusers]'"
        ) from err
    local = is_diffusers_dit(path)
    if local is not None:
        return DiffusersDiT(DiTTransformer2DModel.from_pretrained(str(local)).eval())
    try:  # a hub id such as facebook/DiT-XL-2-256 (a pipeline: the transformer subfolder)
        transformer = DiTTransformer2DModel.from_pretrained(str(path), subfolder="transformer")
    except Exception as err:  # noqa: BLE001 - network, missing repo, wrong layout
        raise DitqError(
            f"{path} is neither a diffusers DiT directory nor a hub id diffusers could "
            f"download ({type(err).__name__}); pass a local model or pipeline directory"
        ) from err
    return DiffusersDiT(transformer.eval())


@register_adapter
class DiffusersDiTAdapter(DiffusersAdapter):
    family = "diffusers-dit"
    block_roles = BLOCK_LAYERS
    model_class = DiffusersDiT
    model: DiffusersDiT

    @classmethod
    def build(cls, architecture: dict) -> nn.Module:
        return DiffusersDiT.from_config(architecture)

    def architecture(self) -> dict:
        return dict(self.model.transformer.config)

    def quantizable_layers(self) -> list[tuple[str, str]]:
        layers = [(f"{PREFIX}.pos_embed.proj.linear", "embedders")]
        for index in range(self.num_blocks()):
            block = self.block_name(index)
            layers += [(f"{block}.{name}", "embedders") for name in EMBEDDER_LAYERS]
            layers.append((f"{block}.{ADALN_LINEAR}", "adaln"))
            layers += [(n, "blocks") for names in self.block_layers(index).values() for n in names]
        return layers + [(f"{PREFIX}.proj_out_1", "adaln"), (f"{PREFIX}.proj_out_2", "final_layer")]

    def input_fold(self, layer: str) -> InputFold | None:
        found = self.role_of(layer)
        if found is None:
            return None
        index, role = found
        if role in ADALN_CHUNKS:
            return AdaLNFold(f"{self.block_name(index)}.{ADALN_LINEAR}", *ADALN_CHUNKS[role])
        if role == "proj":
            return ValueRowsFold(self.block_layers(index)["qkv"][2], fused=False)
        return None

    def attention_modules(self) -> dict[str, nn.Module]:
        return {
            f"{self.block_name(i)}.attn1": block.attn1
            for i, block in enumerate(self.model.transformer.transformer_blocks)
        }

    def sequential_units(self, quantized: list[str]) -> list[Unit]:
        chosen = set(quantized)
        patch = f"{PREFIX}.pos_embed.proj.linear"
        units = [Unit(patch, False)] if patch in chosen else []
        units += [Unit(self.block_name(i), True) for i in range(self.num_blocks())]
        final = (f"{PREFIX}.proj_out_1", f"{PREFIX}.proj_out_2")
        return units + [Unit(name, False) for name in final if name in chosen]
