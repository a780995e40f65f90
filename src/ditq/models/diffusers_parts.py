"""Pieces shared by diffusers' transformer families: the patch convolution as a linear
over patches, an attention processor with ditq's matmul hook points, the DiTConfig a
diffusers transformer corresponds to, and the adapter answers both families share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import DitqError
from ditq.models.adapter import ModelAdapter, explicit_attention
from ditq.models.dit import DiTConfig

PREFIX = "transformer"  # the wrapped diffusers module's attribute name


class PatchLinear(nn.Module):
    """A p x p convolution with stride p, run as a linear over flattened (C, p, p) patches;
    returns the convolution's (N, C_out, H/p, W/p) output."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        out_channels, in_channels, p, _ = conv.weight.shape
        if conv.stride != (p, p) or conv.kernel_size != (p, p) or conv.padding != (0, 0):
            raise DitqError("PatchLinear replaces a p x p convolution with stride p only")
        self.patch_size = p
        self.linear = nn.Linear(in_channels * p * p, out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        out = self.linear(patches.reshape(n, h // p, w // p, c * p * p))
        return out.permute(0, 3, 1, 2)


class QuantizableAttnProcessor:
    """diffusers' attention (self- or cross-, with an optional additive mask) with ditq's
    matmul hook points ``q_act``, ``k_act``, ``v_act``, ``attn_act`` (identities unless
    quantized); SDPA unless the module's ``explicit_matmuls`` is set."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, x.shape[1], attn.heads, -1).transpose(1, 2)

        q = split(attn.to_q(hidden_states))
        k, v = split(attn.to_k(context)), split(attn.to_v(context))
        if attn.explicit_matmuls:
            out = explicit_attention(attn, q, k, v, attn.scale, attention_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return attn.to_out[1](attn.to_out[0](out))


def prepare_transformer(transformer: nn.Module) -> None:
    """Swap in :class:`PatchLinear` for the patch convolution and
    :class:`QuantizableAttnProcessor` in every attention (in place; same function)."""
    if isinstance(transformer.pos_embed.proj, nn.Conv2d):
        transformer.pos_embed.proj = PatchLinear(transformer.pos_embed.proj)
    attentions = [m for m in transformer.modules() if hasattr(m, "set_processor")]
    for attn in attentions:
        plain = (
            not attn.residual_connection
            and attn.rescale_output_factor == 1
            and attn.norm_q is None
            and attn.spatial_norm is None
            and attn.group_norm is None
        )
        if not plain:
            raise DitqError(
                f"this {type(transformer).__name__}'s attention has options ditq cannot run"
            )
        for point in ("q_act", "k_act", "v_act", "attn_act"):
            setattr(attn, point, nn.Identity())
        attn.explicit_matmuls = False
        attn.set_processor(QuantizableAttnProcessor())


def dit_config(transformer: nn.Module, num_classes: int) -> DiTConfig:
    """The official DiT's description of a diffusers transformer with ``num_classes``
    conditions (class labels, or prompts for PixArt)."""
    c = transformer.config
    hidden = c.num_attention_heads * c.attention_head_dim
    return DiTConfig(
        depth=c.num_layers,
        hidden_size=hidden,
        patch_size=c.patch_size,
        num_heads=c.num_attention_heads,
        input_size=c.sample_size,
        in_channels=c.in_channels,
        num_classes=num_classes,
        learn_sigma=c.out_channels == 2 * c.in_channels,
        mlp_ratio=transformer.transformer_blocks[0].ff.net[0].proj.out_features / hidden,
    )


class DiffusersAdapter(ModelAdapter):
    """What diffusers' families share: blocks in ``transformer.transformer_blocks``, each
    with the linears of ``block_roles`` (role to names inside a block)."""

    block_roles: dict[str, tuple[str, ...]]
    chained_blocks = True

    def num_blocks(self) -> int:
        return len(self.model.transformer.transformer_blocks)

    def block_name(self, index: int) -> str:
        return f"{PREFIX}.transformer_blocks.{index}"

    def block_layers(self, index: int) -> dict[str, tuple[str, ...]]:
        block = self.block_name(index)
        roles = self.block_roles.items()
        return {role: tuple(f"{block}.{n}" for n in names) for role, names in roles}
