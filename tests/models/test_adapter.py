"""The official DiT's adapter against the model itself: the layers it lists are exactly the
model's linears, in the order the forward pass runs them; folds and units as documented."""

import pytest
import torch
from torch import nn

from ditq.errors import DitqError
from ditq.models.adapter import (
    LAYER_GROUPS,
    AdaLNFold,
    ValueRowsFold,
    adapter_class,
    adapter_for,
)
from ditq.models.dit_adapter import DiTAdapter

from conftest import tiny_dit


def forward_order(model: nn.Module) -> list[str]:
    """Names of the linears in the order one forward pass calls them (hooks, not names)."""
    names = {module: name for name, module in model.named_modules()}
    called: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda module, _args: called.append(names[module]))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 1]))
    for handle in handles:
        handle.remove()
    return called


def test_quantizable_layers_are_every_linear_in_forward_order():
    model = tiny_dit()
    adapter = adapter_for(model)
    assert isinstance(adapter, DiTAdapter)
    listed = [name for name, _ in adapter.quantizable_layers()]
    assert listed == forward_order(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(listed) == sorted(linears)
    assert adapter.layer_names(LAYER_GROUPS) == listed
    assert adapter.layer_names(("blocks",)) == [
        f"blocks.{i}.{layer}"
        for i in range(2)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    with pytest.raises(DitqError, match="unknown layer groups"):
        adapter.layer_names(("heads",))


def test_folds_roles_and_units():
    model = tiny_dit()
    adapter = adapter_for(model)
    assert adapter.input_fold("blocks.1.attn.qkv") == AdaLNFold("blocks.1.adaLN_modulation.1", 0, 1)
    assert adapter.input_fold("blocks.1.mlp.fc1") == AdaLNFold("blocks.1.adaLN_modulation.1", 3, 4)
    assert adapter.input_fold("blocks.0.attn.proj") == ValueRowsFold("blocks.0.attn.qkv")
    assert adapter.input_fold("blocks.0.mlp.fc2") is None
    assert adapter.input_fold("x_embedder.proj") is None
    assert adapter.role_of("blocks.1.mlp.fc2") == (1, "fc2")
    assert adapter.role_of("final_layer.linear") is None
    assert adapter.block_layers(0)["qkv"] == ("blocks.0.attn.qkv",)
    assert adapter.role_groups(("fc1",)) == [("blocks.0.mlp.fc1",), ("blocks.1.mlp.fc1",)]
    assert adapter.role_groups(("proj", "qkv")) == [
        ("blocks.0.attn.proj",),
        ("blocks.0.attn.qkv",),
        ("blocks.1.attn.proj",),
        ("blocks.1.attn.qkv",),
    ]
    assert list(adapter.attention_modules()) == ["blocks.0.attn", "blocks.1.attn"]
    units = adapter.sequential_units(["x_embedder.proj", "final_layer.linear"])
    assert [(u.name, u.is_block) for u in units] == [
        ("x_embedder.proj", False),
        ("blocks.0", True),
        ("blocks.1", True),
        ("final_layer.linear", False),
    ]
    assert adapter.tokens_per_entry() == 16


def test_build_from_the_recorded_architecture_and_unknown_families():
    model = tiny_dit()
    adapter = adapter_for(model)
    rebuilt = adapter_class(adapter.family).build(adapter.architecture())
    assert rebuilt.config == model.config
    with pytest.raises(DitqError, match="no adapter for a Linear"):
        adapter_for(nn.Linear(2, 2))
    with pytest.raises(DitqError, match="family 'pixart' is not known"):
        adapter_class("pixart")
