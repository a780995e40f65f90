"""diffusers' ``PixArtTransformer2DModel`` (PixArt-α, PixArt-Σ) as a ditq model family:
:class:`DiffusersPixArt` and its adapter.

Text conditioning as a table: :class:`DiffusersPixArt` holds the text encoder's outputs of
P prompts and of the empty prompt (``prompt_embeds`` (P + 1, L, C), ``prompt_mask``
(P + 1, L)), and ``model(x, t, y)`` conditions entry i on prompt ``y[i]``, P being the
empty prompt. A prompt index then plays the part of a class label everywhere in ditq
(calibration sets, samplers, classifier-free guidance with the empty prompt as the null
condition); ``set_prompts`` replaces the table. The text encoder and the VAE stay outside
and in float. ``model.transformer`` keeps diffusers' forward signature.

Structure for the adapter: the patch convolution (as a linear over patches), the
adaLN-single timestep embedder (``adaln_single.emb``) and its modulation linear
(``adaln_single.linear``, shared by every block, each block adding its own
``scale_shift_table``) and the caption projection (``caption_projection.linear_1/2``); per
block a self-attention (``attn1``, separate q/k/v), a cross-attention to the text tokens
(``attn2``: ``to_q`` reads the hidden state, ``to_k``/``to_v`` the projected caption) and
the MLP (``ff.net.0.proj``, ``ff.net.2``); ``proj_out``.

Folding: the modulation of qkv's and fc1's inputs comes from one linear shared by all
blocks plus a per-block table, so a per-block factor has no exact offline fold: it is
applied online. proj's (and the cross-attention's output projection's) factor folds into
the rows of its attention's v projection, exactly; the cross-attention's k/v inputs (the
projected caption, shared by all blocks) take their factors online.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ditq.errors import DitqError
from ditq.models.adapter import InputFold, Unit, ValueRowsFold, register_adapter
from ditq.models.diffusers_parts import PREFIX, DiffusersAdapter, dit_config, prepare_transformer
from ditq.models.dit import DiT

CLASS_NAME = "PixArtTransformer2DModel"
BLOCK_LAYERS = {
    "qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "proj": ("attn1.to_out.0",),
    "cross_q": ("attn2.to_q",),
    "cross_kv": ("attn2.to_k", "attn2.to_v"),
    "cross_proj": ("attn2.to_out.0",),
    "fc1": ("ff.net.0.proj",),
    "fc2": ("ff.net.2",),
}
"""Roles in forward order; ``cross_*`` are the cross-attention's linears, quantized like
the others and smoothed by no method."""
VALUE_ROWS = {"proj": "attn1.to_v", "cross_proj": "attn2.to_v"}
CAPTION_LAYERS = ("caption_projection.linear_1", "caption_projection.linear_2")
VAE_SCALE = 8
MAX_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
"""Text tokens per prompt of each pipeline (the diffusers pipelines' ``max_sequence_length``)."""
DEFAULT_PROMPTS = (
    "a red fox standing in fresh snow",
    "a bowl of ramen on a wooden table, steam rising",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dusk",
    "a close-up photo of a hummingbird drinking from a flower",
    "a futuristic city skyline at night with neon lights",
    "a cozy cabin in a pine forest, morning fog",
    "a plate of colorful macarons on a marble counter",
)
"""Calibration prompts when none are given (``--calib-prompts``)."""
"""Pixels per latent position (PixArt's micro-conditions are in pixels)."""


class DiffusersPixArt(nn.Module):
    """A ``PixArtTransformer2DModel`` with a prompt table and the official DiT's interface
    (module docstring)."""

    forward_with_cfg = DiT.forward_with_cfg

    def __init__(
        self, transformer: nn.Module, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor
    ) -> None:
        super().__init__()
        prepare_transformer(transformer)
        self.transformer = transformer
        self.register_buffer("prompt_embeds", prompt_embeds)
        self.register_buffer("prompt_mask", prompt_mask)
        self.set_prompts(prompt_embeds, prompt_mask)

    def set_prompts(self, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Condition on these prompts: (P + 1, L, C) encoder outputs and (P + 1, L) masks,
        the last row the empty prompt."""
        if prompt_embeds.dim() != 3 or prompt_mask.shape != prompt_embeds.shape[:2]:
            raise DitqError(
                "prompt embeddings must be (prompts + 1, tokens, channels) with a (prompts + "
                f"1, tokens) mask; got {tuple(prompt_embeds.shape)} and {tuple(prompt_mask.shape)}"
            )
        self.prompt_embeds, self.prompt_mask = prompt_embeds, prompt_mask
        prompts = len(prompt_embeds) - 1
        self.num_classes = prompts
        self.in_channels = self.transformer.config.in_channels
        self.config = dit_config(self.transformer, prompts)

    @classmethod
    def from_architecture(cls, architecture: dict) -> DiffusersPixArt:
        from diffusers import PixArtTransformer2DModel

        transformer = PixArtTransformer2DModel.from_config(architecture["transformer"])
        rows, tokens = architecture["prompts"] + 1, architecture["text_tokens"]
        embeds = torch.zeros(rows, tokens, architecture["text_dim"])
        model = cls(transformer, embeds, torch.zeros(rows, tokens))
        model.prompt_texts = architecture.get("prompt_texts")
        model.pipeline_dir = architecture.get("pipeline_dir")
        return model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        added = {"resolution": None, "aspect_ratio": None}
        if self.transformer.adaln_single.emb.use_additional_conditions:
            n, _, h, w = x.shape
            pixels = torch.tensor([[h * VAE_SCALE, w * VAE_SCALE]], device=x.device)
            added = {
                "resolution": pixels.float().repeat(n, 1),
                "aspect_ratio": torch.ones(n, 1, device=x.device),
            }
        return self.transformer(
            x,
            encoder_hidden_states=self.prompt_embeds[y].to(x.dtype),
            timestep=t,
            encoder_attention_mask=self.prompt_mask[y],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


@torch.no_grad()
def encode_prompts(
    text_encoder: nn.Module, tokenizer, prompts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt table of ``prompts`` and the empty prompt (last), as the PixArt pipelines
    encode them: tokens padded to ``max_length``, the encoder's last hidden state, and the
    attention mask of the tokens."""
    if not prompts:
        raise DitqError("no prompts to condition on: give at least one (e.g. --calib-prompts)")
    tokens = tokenizer(
        [*prompts, ""],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return embeds.float().cpu(), mask.float().cpu()


def pixart_pipeline_dir(path: str | Path) -> Path | None:
    """``path`` when it is a PixArt pipeline directory (its ``transformer/`` is a
    ``PixArtTransformer2DModel``), else None; a PixArt transformer directory alone is an
    error (its prompts need the pipeline's text encoder)."""
    if _class_name(Path(path)) == CLASS_NAME:
        raise DitqError(
            f"{path} is a PixArt transformer without its text encoder: pass the pipeline "
            "directory that holds it (transformer/, text_encoder/, tokenizer/)"
        )
    return Path(path) if _class_name(Path(path) / "transformer") == CLASS_NAME else None


def _class_name(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def pipeline_prompt_table(
    path: str | Path, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_prompts` with the text encoder and tokenizer of the PixArt pipeline
    directory ``path``, at its pipeline's token count (``MAX_TOKENS``)."""
    try:
        from transformers import AutoTokenizer, T5EncoderModel
    except ImportError as err:
        raise DitqError(
            "PixArt's prompts need transformers: pip install 'ditq[diffusers]'"
        ) from err
    path = Path(path)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    max_length = MAX_TOKENS.get(index.get("_class_name"), MAX_TOKENS["PixArtAlphaPipeline"])
    text_encoder = T5EncoderModel.from_pretrained(str(path / "text_encoder")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return encode_prompts(text_encoder, tokenizer, prompts, max_length)


def load_pixart(path: str | Path, prompts: list[str] | None = None) -> DiffusersPixArt:
    """A PixArt pipeline directory (transformer, text encoder and tokenizer) as a
    :class:`DiffusersPixArt` conditioned on ``prompts`` (``DEFAULT_PROMPTS`` otherwise)."""
    try:
        from diffusers import PixArtTransformer2DModel
    except ImportError as err:
        raise DitqError("PixArt needs diffusers: pip install 'ditq[diffusers]'") from err
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    embeds, mask = pipeline_prompt_table(path, prompts)
    transformer = PixArtTransformer2DModel.from_pretrained(str(Path(path) / "transformer"))
    model = DiffusersPixArt(transformer.eval(), embeds, mask)
    model.prompt_texts, model.pipeline_dir = prompts, str(Path(path).resolve())
    return model


def set_prompts(model: nn.Module, prompts: list[str]) -> None:
    """Condition ``model`` (a :class:`DiffusersPixArt`, quantized or not) on ``prompts``,
    encoded by the text encoder of the pipeline directory it came from."""
    if not isinstance(model, DiffusersPixArt):
        raise DitqError("--prompt conditions text-to-image models (PixArt); this one: --classes")
    pipeline = getattr(model, "pipeline_dir", None)
    if pipeline is None or pixart_pipeline_dir(pipeline) is None:
        raise DitqError(
            f"the PixArt pipeline this model came from ({pipeline}) is not there to encode the "
            "prompts; sample with the prompts it was quantized with (--classes)"
        )
    embeds, mask = pipeline_prompt_table(pipeline, prompts)
    device, dtype = model.prompt_embeds.device, model.prompt_embeds.dtype
    model.set_prompts(embeds.to(device, dtype), mask.to(device, dtype))
    model.prompt_texts = list(prompts)


def pipeline_vae(model: nn.Module) -> str | None:
    """The ``vae`` folder of a PixArt model's pipeline directory, if there is one."""
    pipeline = getattr(model, "pipeline_dir", None)
    vae = Path(pipeline) / "vae" if pipeline else None
    return str(vae) if vae is not None and (vae / "config.json").is_file() else None


@register_adapter
class DiffusersPixArtAdapter(DiffusersAdapter):
    family = "diffusers-pixart"
    block_roles = BLOCK_LAYERS
    model_class = DiffusersPixArt
    model: DiffusersPixArt

    @classmethod
    def build(cls, architecture: dict) -> nn.Module:
        return DiffusersPixArt.from_architecture(architecture)

    def architecture(self) -> dict:
        rows, tokens, channels = self.model.prompt_embeds.shape
        return {
            "transformer": dict(self.model.transformer.config),
            "prompts": rows - 1,
            "text_tokens": tokens,
            "text_dim": channels,
            "prompt_texts": getattr(self.model, "prompt_texts", None),
            "pipeline_dir": getattr(self.model, "pipeline_dir", None),
        }

    def embedder_layers(self) -> list[tuple[str, str]]:
        """The linears before the blocks, in forward order: the patch embedding, the
        timestep (and, at 1024 px, resolution and aspect-ratio) embedders, the adaLN-single
        linear, the caption projection."""
        emb = self.model.transformer.adaln_single.emb
        timestep = [
            (f"{PREFIX}.adaln_single.emb.{name}", "embedders")
            for name, module in emb.named_modules()
            if isinstance(module, nn.Linear)
        ]
        return [
            (f"{PREFIX}.pos_embed.proj.linear", "embedders"),
            *timestep,
            (f"{PREFIX}.adaln_single.linear", "adaln"),
            *[(f"{PREFIX}.{name}", "embedders") for name in CAPTION_LAYERS],
        ]

    def quantizable_layers(self) -> list[tuple[str, str]]:
        layers = self.embedder_layers()
        for index in range(self.num_blocks()):
            layers += [(n, "blocks") for names in self.block_layers(index).values() for n in names]
        return layers + [(f"{PREFIX}.proj_out", "final_layer")]

    def input_fold(self, layer: str) -> InputFold | None:
        found = self.role_of(layer)
        if found is None or found[1] not in VALUE_ROWS:
            return None
        index, role = found
        return ValueRowsFold(f"{self.block_name(index)}.{VALUE_ROWS[role]}", fused=False)

    def attention_modules(self) -> dict[str, nn.Module]:
        found = {}
        for i, block in enumerate(self.model.transformer.transformer_blocks):
            found[f"{self.block_name(i)}.attn1"] = block.attn1
            found[f"{self.block_name(i)}.attn2"] = block.attn2
        return found

    def sequential_units(self, quantized: list[str]) -> list[Unit]:
        chosen = set(quantized)
        units = [Unit(name, False) for name, _ in self.embedder_layers() if name in chosen]
        units += [Unit(self.block_name(i), True) for i in range(self.num_blocks())]
        final = f"{PREFIX}.proj_out"
        return units + ([Unit(final, False)] if final in chosen else [])
