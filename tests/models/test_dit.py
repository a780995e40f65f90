import pytest
import torch

from ditq.errors import DitqError
from ditq.models import ARCHITECTURES, DiT, config_for
from ditq.models.dit import normalize_arch_name

from conftest import tiny_dit


def _official_param_shapes(depth, hidden, patch, in_ch, num_classes, input_size, learn_sigma):
    """Parameter names and shapes of the official models.py, written out by hand."""
    out_ch = in_ch * 2 if learn_sigma else in_ch
    shapes = {
        "pos_embed": (1, (input_size // patch) ** 2, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.qkv.weight": (3 * hidden, hidden),
            b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden),
            b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (4 * hidden, hidden),
            b + "mlp.fc1.bias": (4 * hidden,),
            b + "mlp.fc2.weight": (hidden, 4 * hidden),
            b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
            b + "adaLN_modulation.1.bias": (6 * hidden,),
        }
    return shapes


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_official_layout_for_all_twelve_configurations(arch):
    shape = ARCHITECTURES[arch]
    with torch.device("meta"):
        model = DiT(config_for(arch, input_size=32))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _official_param_shapes(
        shape["depth"], shape["hidden_size"], shape["patch_size"], 4, 1000, 32, True
    )
    assert got == expected


def test_dit_xl2_parameter_count_matches_the_paper_release():
    # The official train.py prints "DiT Parameters: 675,129,632" for DiT-XL/2 at 256 px.
    with torch.device("meta"):
        model = DiT(config_for("DiT-XL/2", input_size=32))
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_arch_names_normalize_and_unknown_names_fail():
    assert normalize_arch_name("DiT-S-2") == "DiT-S/2"
    assert normalize_arch_name("DiT_XL_8") == "DiT-XL/8"
    with pytest.raises(DitqError, match="unknown architecture"):
        config_for("DiT-M/2")


def test_explicit_attention_equals_sdpa():
    model = tiny_dit()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 4])
    reference = model(x, t, y)
    for block in model.blocks:
        block.attn.explicit_matmuls = True
    torch.testing.assert_close(model(x, t, y), reference, rtol=1e-5, atol=1e-5)


def _manual_attention(attn, x):
    """Softmax(QK^T/sqrt(d))V per head, written from the definition in float64."""
    B, N, C = x.shape
    qkv = x.double() @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, v = qkv.split(C, dim=-1)
    heads = attn.num_heads
    q, k, v = (z.reshape(B, N, heads, C // heads).transpose(1, 2) for z in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / (C // heads) ** 0.5, dim=-1)
    out = (w @ v).transpose(1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


def test_attention_matches_float64_definition():
    attn = tiny_dit().blocks[0].attn
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(attn(x).double(), _manual_attention(attn, x), rtol=1e-4, atol=1e-5)


def test_forward_with_cfg_official_semantics():
    model = tiny_dit()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([700, 700])
    y = torch.tensor([2, 1])
    doubled = torch.cat([x, torch.randn_like(x)])  # second half must be ignored
    out = model.forward_with_cfg(
        doubled, torch.cat([t, t]), torch.cat([y, torch.full_like(y, 4)]), 4.0
    )
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 4))
    guided = 3  # eps channels; the other 3 are the variance prediction
    expected_eps = uncond[:, :guided] + 4.0 * (cond[:, :guided] - uncond[:, :guided])
    torch.testing.assert_close(out[:2, :guided], expected_eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[2:, :guided], expected_eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:2, guided:], cond[:, guided:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2:, guided:], uncond[:, guided:], rtol=1e-5, atol=1e-6)


def test_cfg_on_four_channel_latents_guides_three_channels_by_default():
    model = tiny_dit(in_channels=4)
    x = torch.randn(1, 4, 8, 8)
    t, y, null = torch.tensor([300]), torch.tensor([1]), torch.tensor([4])
    cond, uncond = model(x, t, y), model(x, t, null)
    args = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 2.0)
    official = model.forward_with_cfg(*args)
    all_channels = model.forward_with_cfg(*args, cfg_channels=None)
    torch.testing.assert_close(official[:1, 3], cond[:, 3])  # 4th eps channel unguided
    torch.testing.assert_close(
        all_channels[:1, 3], uncond[:, 3] + 2.0 * (cond[:, 3] - uncond[:, 3]), rtol=1e-4, atol=1e-5
    )


def test_patch_embedding_is_the_official_strided_convolution_in_float64():
    model = tiny_dit(patch_size=2).double()
    conv_weight = model.state_dict()["x_embedder.proj.weight"]
    assert conv_weight.shape == (32, 3, 2, 2)  # saved in the official convolution layout
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    reference = (
        torch.nn.functional.conv2d(x, conv_weight, model.x_embedder.proj.bias, stride=2)
        .flatten(2)
        .transpose(1, 2)
    )  # the official PatchEmbed
    torch.testing.assert_close(model.x_embedder(x), reference, rtol=1e-12, atol=1e-12)
    again = tiny_dit(seed=5).double()
    again.load_state_dict(model.state_dict())  # loads the 4-d official layout back
    torch.testing.assert_close(again.x_embedder(x), reference, rtol=1e-12, atol=1e-12)
