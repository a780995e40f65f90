import json

import pytest
import torch
from safetensors import safe_open

import ditq
from ditq import load_model
from ditq.calib.dataset import build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings
from ditq.errors import DitqError
from ditq.methods import RTNConfig
from ditq.pipeline.checkpoint import MANIFEST, WEIGHTS

from conftest import tiny_dit


def _quantized(wbits=4, **kwargs):
    model = tiny_dit()
    settings = SamplingSettings(sampler="ddim", steps=3, seed=1)
    calib = build_calibration_set(model, 2, settings, progress=False)
    config = RTNConfig(wbits=wbits, abits=8, **kwargs)
    ditq.quantize(model, config, calib, progress=False)
    return model, config


def _inputs():
    torch.manual_seed(2)
    return torch.randn(2, 3, 8, 8), torch.tensor([900, 10]), torch.tensor([1, 4])


def test_round_trip_gives_identical_outputs_and_stores_packed_int4(tmp_path):
    model, config = _quantized(wbits=4, w_granularity="group", w_group_size=16, attn_bits=8)
    ditq.save(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
    with safe_open(str(tmp_path / "q" / WEIGHTS), "pt") as f:
        codes = f.get_tensor("blocks.0.attn.qkv.weight_codes")
        assert "blocks.0.attn.qkv.weight" not in set(f.keys())
    assert codes.dtype == torch.uint8 and codes.shape == (96, 16)  # 32 inputs, two per byte
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    assert manifest["layers"]["blocks.0.mlp.fc1"]["weight"]["bits"] == 4
    assert manifest["method_config"]["w_group_size"] == 16


def test_incompatible_version_and_non_ditq_directories(tmp_path):
    model, config = _quantized(wbits=8)
    ditq.save(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    manifest["format_version"] = 99
    manifest["ditq_version"] = "9.0"
    (tmp_path / "q" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DitqError, match="written by ditq 9.0 in format version 99"):
        load_model(tmp_path / "q")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DitqError, match="neither one written by ditq quantize"):
        load_model(tmp_path / "empty")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, config = _quantized(wbits=8)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("ditq.pipeline.checkpoint.save_file", broken)
    with pytest.raises(RuntimeError):
        ditq.save(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
