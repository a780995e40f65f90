"""The Diffusion Transformer of Peebles & Xie (2023), parameter-compatible with the
official ``facebookresearch/DiT`` ``models.py``.

Every parameter and buffer has the official name and shape, so official checkpoints load
with ``load_state_dict(strict=True)``. Two additions, neither of which adds state:

- ``Attention`` exposes ``q_act``, ``k_act``, ``v_act`` and ``attn_act`` hook points
  (identities by default) on the inputs of the two attention matmuls, so that calibration
  hooks can observe them and quantization can replace them. While they are identities and
  ``explicit_matmuls`` is off, attention runs through SDPA.
- ``DiT.forward_with_cfg`` takes ``cfg_channels`` (default 3, the official behaviour that
  guides only the first three eps channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import DitqError
from ditq.models.adapter import explicit_attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by a two-layer MLP (official layout)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period)
            * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device)
            / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The embedding of timesteps ``t``, computed in ``dtype`` (default: the first
        linear's weight dtype; the model passes its own when that linear is quantized)."""
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(dtype or self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row (index ``num_classes``) for the null class."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Image to patch tokens: the official stride-p convolution, run as patches x linear.

    A p x p convolution with stride p is a linear map of each flattened patch, so ``proj``
    is an ``nn.Linear`` over the (C, p, p)-flattened patch (row-major tokens, as the
    convolution's ``flatten(2).transpose(1, 2)``): the quantized layers, hooks and real
    kernels apply to it as to any linear. Its weight loads from and saves to the official
    ``(hidden, C, p, p)`` convolution layout, so checkpoints stay official.
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Linear(in_channels * patch_size**2, hidden_size, bias=True)
        self._register_load_state_dict_pre_hook(self._weight_from_conv_layout)
        self._register_state_dict_hook(PatchEmbed._weight_to_conv_layout)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images to (N, H/p · W/p, C·p·p) flattened patches."""
        n, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.patches(x))

    def _weight_from_conv_layout(self, state_dict: dict, prefix: str, *args) -> None:
        key = prefix + "proj.weight"
        weight = state_dict.get(key)
        if weight is not None and weight.dim() == 4:
            state_dict[key] = weight.reshape(weight.shape[0], -1)

    @staticmethod
    def _weight_to_conv_layout(module: PatchEmbed, state_dict: dict, prefix: str, *args) -> None:
        key = prefix + "proj.weight"
        weight = state_dict.get(key)
        if type(module.proj) is nn.Linear and weight is not None and weight.dim() == 2:
            p = module.patch_size
            state_dict[key] = weight.reshape(weight.shape[0], module.in_channels, p, p)


class BlockBranch(nn.Module):
    """A DiT block branch from its first linear to its last (the attention's ``qkv`` to
    ``proj``, the MLP's ``fc1`` to ``fc2``; :attr:`FIRST` and :attr:`LAST` name them,
    :meth:`_between` is the work between them), and what real-kernel layers fuse around
    it: the block's gated residual in the last layer's epilogue (:meth:`gated_residual`),
    and then the first layer's input quantization in the block's norm kernel
    (:meth:`norm_branch`)."""

    FIRST: str
    LAST: str

    def _between(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.LAST)(self._between(getattr(self, self.FIRST)(x)))

    @property
    def fuses_gated_residual(self) -> bool:
        return getattr(getattr(self, self.LAST), "fuses_gated_residual", False)

    def gated_residual(
        self, x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor
    ) -> torch.Tensor:
        """``residual + gate ⊙ self(x)``, added by the last layer
        (:attr:`fuses_gated_residual`)."""
        y = self._between(getattr(self, self.FIRST)(x))
        return getattr(self, self.LAST).gated_residual(y, residual, gate)

    @property
    def quantizes_norm(self) -> bool:
        first = getattr(self, self.FIRST)
        return getattr(first, "quantizes_norm", False) and self.fuses_gated_residual

    def norm_branch(
        self,
        x: torch.Tensor,
        eps: float,
        shift: torch.Tensor,
        scale: torch.Tensor,
        gate: torch.Tensor,
    ) -> torch.Tensor:
        """``x + gate ⊙ self(modulate(LayerNorm(x), shift, scale))`` with the first layer's
        input quantized in the norm's kernel and the residual added by the last layer
        (:attr:`quantizes_norm`)."""
        y = self._between(getattr(self, self.FIRST).forward_from_norm(x, eps, shift, scale))
        return getattr(self, self.LAST).gated_residual(y, x, gate)


class Attention(BlockBranch):
    """Multi-head self-attention with timm's ``qkv``/``proj`` parameter layout.

    ``q_act``, ``k_act``, ``v_act`` (inputs of Q·Kᵀ and P·V) and ``attn_act`` (the softmax
    output) are hook points. The explicit path runs when ``explicit_matmuls`` is set.
    """

    FIRST, LAST = "qkv", "proj"

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.q_act: nn.Module = nn.Identity()
        self.k_act: nn.Module = nn.Identity()
        self.v_act: nn.Module = nn.Identity()
        self.attn_act: nn.Module = nn.Identity()
        self.explicit_matmuls = False

    def _between(self, qkv: torch.Tensor) -> torch.Tensor:
        """The attention of ``qkv``'s output (B, N, 3C), heads concatenated: ``proj``'s
        input."""
        B, N, C3 = qkv.shape
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.explicit_matmuls:
            out = explicit_attention(self, q, k, v, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, N, C3 // 3)


class Mlp(BlockBranch):
    """``fc1 -> GELU(tanh) -> fc2`` (timm ``Mlp`` layout)."""

    FIRST, LAST = "fc1", "fc2"

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def _between(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(hidden)


def gated_residual(
    module: nn.Module, x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``residual + gate ⊙ module(x)`` (adaLN-Zero's gated residual), by the module itself
    where its last layer adds it in its kernel (``fuses_gated_residual``: real-kernel
    layers; then the module's own forward hooks do not run)."""
    if getattr(module, "fuses_gated_residual", False):
        return module.gated_residual(x, residual, gate)
    return residual + gate.unsqueeze(1) * module(x)


def adaln_branch(
    module: nn.Module,
    norm: nn.LayerNorm,
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    gate: torch.Tensor,
) -> torch.Tensor:
    """``x + gate ⊙ module(modulate(norm(x), shift, scale))``: a DiT block's adaLN-Zero
    branch. On CUDA a module that can (``quantizes_norm``: real-kernel layers with a static
    input range) quantizes its input in one kernel with the norm and the modulation, and
    adds the gated residual in its last kernel (its forward hooks do not run then)."""
    fused = getattr(module, "quantizes_norm", False) and norm.weight is None and x.is_cuda
    if fused:
        return module.norm_branch(x, norm.eps, shift, scale, gate)
    return gated_residual(module, modulate(norm(x), shift, scale), x, gate)


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        x = adaln_branch(self.attn, self.norm1, x, shift_msa, scale_msa, gate_msa)
        return adaln_branch(self.mlp, self.norm2, x, shift_mlp, scale_mlp, gate_mlp)


class FinalLayer(nn.Module):
    """adaLN-modulated layer norm and the linear projection back to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to build a DiT; ``arch`` names the official depth/width/patch."""

    depth: int = 28
    hidden_size: int = 1152
    patch_size: int = 2
    num_heads: int = 16
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def arch(self) -> str | None:
        """The official name (e.g. ``DiT-XL/2``) of this depth/width/heads/patch, if any."""
        for name, shape in ARCHITECTURES.items():
            if (shape["depth"], shape["hidden_size"], shape["num_heads"]) == (
                self.depth,
                self.hidden_size,
                self.num_heads,
            ) and shape["patch_size"] == self.patch_size:
                return name
        return None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
}
ARCHITECTURES: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {**shape, "patch_size": patch}
    for size, shape in _SIZES.items()
    for patch in (2, 4, 8)
}
"""The 12 official configurations, ``DiT-XL/2`` ... ``DiT-S/8``."""


def normalize_arch_name(arch: str) -> str:
    """``DiT-S/2``, ``DiT-S-2`` and ``DiT_S_2`` all name the same configuration."""
    name = arch.strip().replace("_", "-")
    head, _, patch = name.rpartition("-")
    return f"{head}/{patch}" if "/" not in name and patch.isdigit() else name


def config_for(arch: str, **overrides) -> DiTConfig:
    """The :class:`DiTConfig` of an official architecture name with optional overrides."""
    key = normalize_arch_name(arch)
    if key not in ARCHITECTURES:
        raise DitqError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return DiTConfig(**{**ARCHITECTURES[key], **overrides})


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (official ``DiT`` class)."""

    def __init__(self, config: DiTConfig | None = None, **kwargs):
        super().__init__()
        config = config if config is not None else DiTConfig(**kwargs)
        self.config = config
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.num_classes = config.num_classes

        self.x_embedder = PatchEmbed(
            config.input_size, config.patch_size, config.in_channels, config.hidden_size
        )
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(
            config.num_classes, config.hidden_size, config.class_dropout_prob
        )
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches, config.hidden_size), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official initialisation, except that adaLN and output layers are not zeroed.

        The official code zeroes them for training; ditq builds random models for tests and
        timing, where a zero output would hide every bug, so they keep Xavier weights.
        """

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=0.02)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches**0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        nn.init.xavier_uniform_(self.x_embedder.proj.weight)  # the official conv's init
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens back to (N, C, H, W) images."""
        c, p = self.out_channels, self.x_embedder.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Noise (and variance) prediction for images ``x`` at timesteps ``t`` with labels ``y``."""
        x = self.x_embedder(x) + self.pos_embed
        table = self.y_embedder.embedding_table.weight  # never quantized: the model's dtype
        c = self.t_embedder(t, table.dtype) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        cfg_channels: int | None = 3,
    ) -> torch.Tensor:
        """Official classifier-free guided forward.

        The batch holds the conditional half first and the unconditional half second; only
        the first half of ``x`` is used. Guidance ``eps_u + s (eps_c - eps_u)`` is applied to
        the first ``cfg_channels`` output channels (official: 3, also for 4-channel latents);
        ``None`` guides all ``in_channels`` eps channels.
        """
        half = x[: len(x) // 2]
        model_out = self(torch.cat([half, half], dim=0), t, y)
        guided = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding, (grid_size**2, embed_dim) (MAE/DiT)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
