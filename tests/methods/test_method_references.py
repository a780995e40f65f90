"""Every method still computes what it computed when the references were recorded
(``method_references.py``): the same packed tensors and the same denoiser output, so that
moving code around cannot change the numerics unnoticed. Tolerances cover float
reassociation only (other thread counts or BLAS blockings): float tensors within 1e-5
relative (DiTAS' low-rank branch as the product of its factors, which an SVD determines
only up to a rotation), integer codes equal except at most 0.1% of them one level apart (a
value within rounding distance of a tie)."""

import numpy as np
import pytest
from method_references import CASES, PATH, calibration_set, run_case


@pytest.fixture(scope="module")
def recorded():
    with np.load(PATH) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def calib():
    return calibration_set()


@pytest.mark.parametrize("name", list(CASES))
def test_method_reproduces_its_recorded_numerics(name, recorded, calib):
    output, tensors = run_case(name, calib)
    prefix = f"{name}/state/"
    stored = {
        key[len(prefix) :]: value for key, value in recorded.items() if key.startswith(prefix)
    }
    assert sorted(tensors) == sorted(stored)
    for key, value in tensors.items():
        if key.endswith(".lowrank_down"):
            continue  # compared through the product below
        if key.endswith(".lowrank_up"):  # an SVD: its factors are unique only up to rotations
            down = key.removesuffix("up") + "down"
            product, expected = value @ tensors[down], stored[key] @ stored[down]
            np.testing.assert_allclose(product, expected, rtol=0, atol=1e-5, err_msg=key)
        elif key.endswith("weight_codes"):
            difference = np.abs(value - stored[key])
            assert difference.max() <= 1 and (difference > 0).mean() <= 1e-3, key
        else:
            np.testing.assert_allclose(value, stored[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(output, recorded[f"{name}/output"], rtol=1e-5, atol=1e-5)
