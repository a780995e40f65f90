import pytest
import torch
from safetensors.torch import save_file

from ditq import load_model
from ditq.errors import DitqError
from ditq.models import infer_config, read_state_dict

from conftest import tiny_dit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["plain", "ema", "model", "safetensors"])
def test_round_trip_all_layouts_and_dtypes(tmp_path, layout, dtype):
    model = tiny_dit(depth=3, num_classes=7)
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if layout == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "m.pt"
        payload = {"plain": sd, "ema": {"ema": sd, "model": {}, "opt": {}}, "model": {"model": sd}}
        torch.save(payload[layout], path)
    loaded = load_model(path, num_heads=2)  # heads leave no trace in the shapes
    assert loaded.config == model.config
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, sd[k].float(), rtol=0, atol=0)


def test_training_checkpoint_prefers_ema(tmp_path):
    ema, raw = tiny_dit(seed=1), tiny_dit(seed=2)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict()}, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(depth=4, hidden_size=64, num_heads=1, patch_size=4, input_size=16),
        dict(in_channels=4, num_classes=10, learn_sigma=False),
        dict(patch_size=1, input_size=4),
    ],
)
def test_architecture_inferred_from_shapes(overrides):
    model = tiny_dit(**overrides)
    inferred = infer_config(model.state_dict())
    for field in ("depth", "hidden_size", "patch_size", "input_size", "in_channels"):
        assert getattr(inferred, field) == getattr(model.config, field)
    assert inferred.num_classes == model.config.num_classes
    assert inferred.learn_sigma == model.config.learn_sigma


def test_dtype_and_overrides(tmp_path):
    model = tiny_dit()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", dtype="bf16", num_heads=4)
    assert loaded.config.num_heads == 4
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_mismatch_names_keys_and_the_fitting_configuration(tmp_path):
    torch.save(tiny_dit().state_dict(), tmp_path / "m.pt")
    with pytest.raises(DitqError) as err:
        load_model(tmp_path / "m.pt", arch="DiT-S/2", input_size=8)
    message = str(err.value)
    assert "x_embedder.proj.weight: checkpoint (32, 3, 2, 2) vs model (384, 3, 2, 2)" in message
    assert "input_size=8, in_channels=3, num_classes=4, learn_sigma=True" in message
    assert "\n" not in message


def test_bad_files_give_one_clear_error(tmp_path):
    with pytest.raises(DitqError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DitqError, match="is not a checkpoint ditq can read") as error:
        read_state_dict(tmp_path / "junk.pt")
    assert "weights_only" not in str(error.value)  # never suggest disabling the safe loader
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DitqError, match="not a DiT state dict"):
        load_model(tmp_path / "other.pt")
