"""The testbed checkpoint predicts the noise of real CIFAR-10 test images: proves loading
and the forward pass against real data."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ditq import load_model
from ditq.diffusion import create_diffusion
from ditq.models import DiT


def _cifar_images(path, count):
    data = np.load(path)
    blob, offsets = data["blob"], data["offsets"]
    images = [
        np.asarray(Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())))
        for i in range(count)
    ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(data["labels"][:count].astype(np.int64))


def _eps_mse(model, x0, y, timesteps):
    diffusion = create_diffusion(None)
    torch.manual_seed(0)
    errors = []
    for t_value in timesteps:
        t = torch.full((len(x0),), t_value)
        noise = torch.randn_like(x0)
        with torch.no_grad():
            eps = model(diffusion.q_sample(x0, t, noise), t, y)[:, :3]
        errors.append(torch.mean((eps - noise) ** 2).item())
    return np.array(errors)


@pytest.mark.slow
def test_testbed_predicts_noise_on_real_cifar(testbed_path, cifar_test_path):
    model = load_model(testbed_path)
    assert model.config.arch == "DiT-S/2"
    assert (model.config.input_size, model.config.in_channels, model.num_classes) == (32, 3, 10)
    x0, y = _cifar_images(cifar_test_path, 32)
    timesteps = [20, 100, 300, 600, 900]
    trained = _eps_mse(model, x0, y, timesteps)
    torch.manual_seed(0)
    untrained = _eps_mse(DiT(model.config).eval(), x0, y, timesteps)
    assert np.all(untrained > 0.9), untrained  # a random network is no better than guessing 0
    assert trained.mean() < 0.15, trained
    assert np.all(trained < 0.2 * untrained), (trained, untrained)
    # Labels matter: the null class is a different (worse or equal) conditional prediction.
    null = _eps_mse(model, x0, torch.full_like(y, 10), [300])
    assert null[0] >= trained[2] * 0.98
