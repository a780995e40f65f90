"""Statistics hooks: layer selection, observed inputs, attention points, captured inputs."""

import copy

import pytest
import torch

from ditq.calib import (
    CalibrationSet,
    attention_point_names,
    build_calibration_set,
    capture_block_io,
    capture_inputs,
    capture_layer_inputs,
    collect_input_stats,
    explicit_attention,
    get_layer,
)
from ditq.diffusion.pipeline import SamplingSettings
from ditq.errors import DitqError
from ditq.models.dit import modulate
from ditq.pipeline.config import LayerSelection
from ditq.quant.observer import ChannelAbsMaxObserver

from conftest import tiny_dit

BLOCK_0 = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


class AbsMax:
    """Running per-channel max |x| over rows, as ``s(X_j)`` in METHODS.md."""

    def __init__(self):
        self.value = None

    def update(self, x):
        batch_max = x.abs().amax(dim=0)
        self.value = batch_max if self.value is None else torch.maximum(self.value, batch_max)


class Recorder:
    """Keeps every batch it sees."""

    def __init__(self):
        self.batches = []

    def update(self, x):
        self.batches.append(x.clone())


class Failing:
    def update(self, x):
        raise RuntimeError("observer failed")


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    settings = SamplingSettings(sampler="ddim", steps=6, cfg_scale=1.5, seed=1)
    return build_calibration_set(
        tiny_dit(), 3, settings, steps=3, classes=[1, 3, 0], progress=False
    )


def reference_inputs(model, calib, names, entries=None):
    """Inputs of the named layers as rows, taken with this test's own hooks in one batch."""
    entries = torch.arange(len(calib)) if entries is None else entries
    inputs = {}

    def keep(name):
        def hook(_module, args):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    handles = [get_layer(model, name).register_forward_pre_hook(keep(name)) for name in names]
    with torch.no_grad():
        model(calib.x[entries], calib.t[entries], calib.y[entries])
    for handle in handles:
        handle.remove()
    return inputs


def assert_no_hooks(model):
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_layer_selection_names_in_forward_order():
    model = tiny_dit()
    assert LayerSelection().names(model) == BLOCK_0 + [n.replace(".0.", ".1.") for n in BLOCK_0]
    everything = LayerSelection(embedders=True, adaln=True, final_layer=True).names(model)
    assert everything[:4] == [
        "x_embedder.proj",
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "blocks.0.adaLN_modulation.1",
    ]
    assert everything[-3:] == [
        "blocks.1.mlp.fc2",
        "final_layer.adaLN_modulation.1",
        "final_layer.linear",
    ]
    assert len(everything) == 3 + 2 * 5 + 2
    layers = [get_layer(model, name) for name in LayerSelection(embedders=True).names(model)]
    assert all(isinstance(m, torch.nn.Linear) for m in layers)
    assert attention_point_names(model)[:2] == ["blocks.0.attn.q_act", "blocks.0.attn.k_act"]
    with pytest.raises(DitqError, match="no layer named 'blocks.7.attn.qkv'"):
        get_layer(model, "blocks.7.attn.qkv")


def test_stats_equal_the_max_over_independently_captured_inputs(calib):
    model = tiny_dit()
    stats = collect_input_stats(
        model,
        calib,
        lambda name: AbsMax(),
        LayerSelection().names(model),
        batch_size=4,
        progress=False,
    )
    reference = reference_inputs(model, calib, stats)
    for name, observer in stats.items():
        torch.testing.assert_close(observer.value, reference[name].abs().amax(dim=0))
    assert_no_hooks(model)


def test_qkv_stats_equal_the_block_math_in_float64(calib):
    model = tiny_dit()
    stats = collect_input_stats(
        model, calib, lambda name: AbsMax(), ["blocks.0.attn.qkv"], progress=False
    )
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        x = double.x_embedder(calib.x.double()) + double.pos_embed
        c = double.t_embedder(calib.t) + double.y_embedder(calib.y)
        block = double.blocks[0]
        shift, scale = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
        qkv_input = modulate(block.norm1(x), shift, scale)
    expected = qkv_input.reshape(-1, 32).abs().amax(dim=0).float()
    torch.testing.assert_close(stats["blocks.0.attn.qkv"].value, expected, rtol=1e-5, atol=1e-5)


def test_per_timestep_stats_are_keyed_by_the_sets_timesteps(calib):
    model = tiny_dit()
    names = ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    per_t = collect_input_stats(
        model,
        calib,
        lambda name: AbsMax(),
        names,
        per_timestep=True,
        batch_size=4,
        progress=False,
    )
    overall = collect_input_stats(model, calib, lambda name: AbsMax(), names, progress=False)
    for name in names:
        assert list(per_t[name]) == calib.timesteps()
        for t, observer in per_t[name].items():
            entries = torch.nonzero(calib.t == t).flatten()
            expected = reference_inputs(model, calib, [name], entries)[name].abs().amax(dim=0)
            torch.testing.assert_close(observer.value, expected)
        largest = torch.stack([o.value for o in per_t[name].values()]).amax(dim=0)
        torch.testing.assert_close(largest, overall[name].value)


def test_patch_embedding_input_is_observed_as_flattened_patches(calib):
    model = tiny_dit()
    stats = collect_input_stats(
        model, calib, lambda name: Recorder(), ["x_embedder.proj"], batch_size=4, progress=False
    )
    seen = torch.cat(stats["x_embedder.proj"].batches)
    assert seen.shape[1:] == (3 * 2 * 2,)
    images = calib.x[torch.cat(list(calib.index_batches(4)))]
    patches = images.unfold(2, 2, 2).unfold(3, 2, 2)  # (N, C, H/p, W/p, p, p), independently
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * 2 * 2)
    torch.testing.assert_close(seen, patches)


def test_hooks_and_attention_flags_are_restored_after_an_observer_fails(calib):
    model = tiny_dit()
    model.blocks[1].attn.explicit_matmuls = True
    with pytest.raises(RuntimeError, match="observer failed"):
        collect_input_stats(
            model, calib, lambda name: Failing(), ["blocks.0.attn.q_act"], progress=False
        )
    assert_no_hooks(model)
    assert [b.attn.explicit_matmuls for b in model.blocks] == [False, True]


def test_attention_points_are_observed_under_explicit_attention(calib):
    model = tiny_dit()
    names = ["blocks.0.attn.q_act", "blocks.1.attn.attn_act"]
    stats = collect_input_stats(model, calib, lambda name: Recorder(), names, progress=False)
    assert [b.attn.explicit_matmuls for b in model.blocks] == [False, False]
    assert_no_hooks(model)
    queries = torch.cat(stats["blocks.0.attn.q_act"].batches)
    assert queries.shape == (18 * 2 * 16, 16)  # (entries · heads · tokens, head_dim)
    qkv_out = {}
    handle = model.blocks[0].attn.qkv.register_forward_hook(
        lambda _module, _args, out: qkv_out.update(out=out)
    )
    with torch.no_grad():
        order = torch.cat(list(calib.index_batches(64)))
        model(calib.x[order], calib.t[order], calib.y[order])
    handle.remove()
    expected_q = qkv_out["out"].reshape(18, 16, 3, 2, 16)[:, :, 0].transpose(1, 2)
    torch.testing.assert_close(queries, expected_q.reshape(-1, 16))
    probabilities = torch.cat(stats["blocks.1.attn.attn_act"].batches)
    assert probabilities.shape == (18 * 2 * 16, 16)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(probabilities)))


def test_explicit_attention_matches_sdpa_and_restores_flags(calib):
    model = tiny_dit()
    x, t, y = calib.x[:4], calib.t[:4], calib.y[:4]
    with torch.no_grad():
        fused = model(x, t, y)
        with explicit_attention(model):
            assert all(b.attn.explicit_matmuls for b in model.blocks)
            explicit = model(x, t, y)
    assert not any(b.attn.explicit_matmuls for b in model.blocks)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)


def test_capture_inputs_returns_rows_in_entry_order_and_subsamples(calib):
    model = tiny_dit()
    reference = reference_inputs(model, calib, ["blocks.1.mlp.fc2"])["blocks.1.mlp.fc2"]
    rows = capture_inputs(model, calib, "blocks.1.mlp.fc2", batch_size=5, progress=False)
    torch.testing.assert_close(rows, reference)
    fc2 = model.blocks[1].mlp.fc2
    some = capture_inputs(model, calib, fc2, batch_size=5, progress=False, max_tokens=100)
    assert 90 <= len(some) <= 100
    assert all(torch.isclose(reference, row, atol=1e-6).all(dim=1).any() for row in some[:10])
    again = capture_inputs(model, calib, fc2, batch_size=5, progress=False, max_tokens=100)
    assert torch.equal(some, again)
    assert_no_hooks(model)
    with pytest.raises(DitqError, match="Linear is not a submodule of the model"):
        capture_inputs(model, calib, torch.nn.Linear(2, 2), progress=False)


def test_capture_layer_inputs_takes_a_whole_block_in_one_pass(calib):
    model = tiny_dit()
    names = ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    reference = reference_inputs(model, calib, names)
    calls = []
    handle = model.blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))
    rows = capture_layer_inputs(model, calib, names, batch_size=5, progress=False)
    handle.remove()
    assert list(rows) == names
    for name in names:
        torch.testing.assert_close(rows[name], reference[name])
    assert not calls, "the forward stops after the block's last layer"
    assert_no_hooks(model)


def test_capture_layer_inputs_feeds_observers_every_row_before_subsampling(calib):
    """The salience of SVDQuant's search rows comes from the same pass: observers see every
    input row although only ``max_tokens`` are kept."""
    model = tiny_dit()
    names = ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]
    reference = reference_inputs(model, calib, names)
    observers = {name: ChannelAbsMaxObserver() for name in names}
    rows = capture_layer_inputs(
        model, calib, names, batch_size=5, progress=False, max_tokens=50, observers=observers
    )
    plain = capture_layer_inputs(model, calib, names, batch_size=5, progress=False, max_tokens=50)
    for name in names:
        assert len(rows[name]) <= 50 and torch.equal(rows[name], plain[name])
        expected = reference[name].abs().amax(dim=0)
        torch.testing.assert_close(observers[name].result().float(), expected)
    assert_no_hooks(model)


def test_capture_block_io_matches_the_block_and_chains(calib):
    model = tiny_dit()
    final_layer_calls = []
    probe = model.final_layer.register_forward_pre_hook(lambda *_: final_layer_calls.append(1))
    first = capture_block_io(model, calib, "blocks.0", batch_size=4, progress=False)
    second = capture_block_io(model, calib, "blocks.1", batch_size=4, progress=False)
    assert not final_layer_calls  # the forward stopped after the captured block
    probe.remove()
    assert_no_hooks(model)
    (x, c), (x2, c2) = first.args, second.args
    assert x.shape == (18, 16, 32) and c.shape == (18, 32)
    with torch.no_grad():
        torch.testing.assert_close(x, model.x_embedder(calib.x) + model.pos_embed)
        torch.testing.assert_close(c, model.t_embedder(calib.t) + model.y_embedder(calib.y))
        torch.testing.assert_close(first.out, model.blocks[0](x, c))
        torch.testing.assert_close(second.out, model.blocks[1](x2, c2))
    torch.testing.assert_close(x2, first.out, rtol=0, atol=0)
    torch.testing.assert_close(c2, c, rtol=0, atol=0)
    with pytest.raises(DitqError, match="no layer named 'blocks.2'"):
        capture_block_io(model, calib, "blocks.2", progress=False)
