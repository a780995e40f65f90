"""The adapter of the official DiT (``ditq.models.dit``, facebookresearch/DiT layout).

Quantizable linears in forward order: the patch embedding (a linear over flattened
patches) and the timestep MLP (``embedders``); per block the adaLN modulation linear
(``adaln``) and qkv, proj, fc1, fc2 (``blocks``); the final layer's adaLN linear and
projection. adaLN chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
so qkv's input folds into chunks 0 and 1 and fc1's into 3 and 4; proj's input is the
attention output, which folds into qkv's V rows; fc2's input comes from GELU (no fold).
Sequential units: the embedder linears one by one, each block with its adaLN linear and
attention quantizers, then the final layer's two linears one by one.
"""

from __future__ import annotations

from torch import nn

from ditq.models.adapter import (
    AdaLNFold,
    InputFold,
    ModelAdapter,
    Unit,
    ValueRowsFold,
    register_adapter,
)
from ditq.models.dit import DiT, DiTConfig

EMBEDDER_LAYERS = ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2")
FINAL_LAYERS = (("final_layer.adaLN_modulation.1", "adaln"), ("final_layer.linear", "final_layer"))
BLOCK_LAYERS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
ADALN_LINEAR = "adaLN_modulation.1"
ADALN_CHUNKS = {"qkv": (0, 1), "fc1": (3, 4)}
"""(shift, scale) chunk of the block's adaLN output that modulates each role's input."""


@register_adapter
class DiTAdapter(ModelAdapter):
    family = "dit"
    model_class = DiT
    model: DiT
    chained_blocks = True

    @classmethod
    def build(cls, architecture: dict) -> nn.Module:
        return DiT(DiTConfig(**architecture))

    def architecture(self) -> dict:
        return self.model.config.to_dict()

    def quantizable_layers(self) -> list[tuple[str, str]]:
        layers = [(name, "embedders") for name in EMBEDDER_LAYERS]
        for index in range(self.num_blocks()):
            layers.append((f"{self.block_name(index)}.{ADALN_LINEAR}", "adaln"))
            layers += [(name, "blocks") for (name,) in self.block_layers(index).values()]
        return layers + list(FINAL_LAYERS)

    def num_blocks(self) -> int:
        return len(self.model.blocks)

    def block_name(self, index: int) -> str:
        return f"blocks.{index}"

    def block_layers(self, index: int) -> dict[str, tuple[str, ...]]:
        return {role: (f"blocks.{index}.{name}",) for role, name in BLOCK_LAYERS.items()}

    def input_fold(self, layer: str) -> InputFold | None:
        found = self.role_of(layer)
        if found is None:
            return None
        index, role = found
        if role in ADALN_CHUNKS:
            return AdaLNFold(f"{self.block_name(index)}.{ADALN_LINEAR}", *ADALN_CHUNKS[role])
        if role == "proj":
            return ValueRowsFold(*self.block_layers(index)["qkv"])
        return None

    def attention_modules(self) -> dict[str, nn.Module]:
        return {f"blocks.{i}.attn": block.attn for i, block in enumerate(self.model.blocks)}

    def sequential_units(self, quantized: list[str]) -> list[Unit]:
        chosen = set(quantized)
        units = [Unit(name, False) for name in EMBEDDER_LAYERS if name in chosen]
        units += [Unit(self.block_name(i), True) for i in range(self.num_blocks())]
        return units + [Unit(name, False) for name, _ in FINAL_LAYERS if name in chosen]
