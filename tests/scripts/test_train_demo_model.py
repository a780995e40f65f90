"""The bundled model's training script: a few CPU steps on real CIFAR-10 images."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from ditq import load_model

from conftest import load_script


def test_training_writes_a_loadable_bf16_model(tmp_path, cifar_test_path):
    script = load_script("scripts/train_demo_model.py")
    out = tmp_path / "demo.safetensors"
    args = script.parse_args(
        [
            "--data",
            str(cifar_test_path),
            "--out",
            str(out),
            "--depth",
            "1",
            "--hidden-size",
            "48",
            "--num-heads",
            "3",
            "--patch-size",
            "4",
            "--batch-size",
            "8",
            "--max-steps",
            "3",
            "--warmup-steps",
            "1",
            "--device",
            "cpu",
            "--no-compile",
            "--log-every",
            "1",
        ]
    )
    settings = script.train(args)
    assert settings["steps"] == 3 and settings["images_seen"] == 24
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert json.loads(meta["ditq.training"])["batch_size"] == 8
    model = load_model(out)  # the head count (3, not hidden/64) comes from the metadata
    assert (model.config.num_heads, model.config.depth, model.config.patch_size) == (3, 1, 4)
    assert (model.config.num_classes, model.config.in_channels) == (10, 3)
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(model(x, torch.tensor([0, 999]), torch.tensor([1, 10]))).all()
