"""PSNR/MSE of quantized-model samples against FP samples from the same seeds."""

from __future__ import annotations

import math

import pytest
import torch

from qsearch.metrics.fidelity import compare, fidelity, mse, psnr


def test_identical_sets_have_infinite_psnr(cifar10_test) -> None:
    x = cifar10_test(64)
    out = fidelity(x, x.clone())
    assert out["mse"] == 0.0
    assert out["psnr"] == math.inf and out["psnr_mean"] == math.inf
    assert set(out) == {"mse", "psnr", "psnr_mean"}  # merged into the engine's metrics dict


def test_psnr_falls_with_noise(cifar10_test) -> None:
    x = cifar10_test(64)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    values = [psnr(x + s * noise, x) for s in (0.001, 0.01, 0.05, 0.2)]
    assert values[0] > 55
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_psnr_uses_data_range_two() -> None:
    # Away from the clamp bounds, PSNR of Gaussian noise of std s is 10 log10(2^2 / s^2).
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 32, 32, generator=g) - 0.5
    s = 0.05
    y = x + s * torch.randn(x.shape, generator=g)
    assert psnr(y, x) == pytest.approx(10 * math.log10(4 / s**2), abs=0.1)
    assert mse(y, x) == pytest.approx(s**2, rel=0.02)
    result = compare(y, x)
    assert result.psnr_mean == pytest.approx(result.psnr, abs=0.2)


def test_clamps_to_image_range_and_checks_shapes() -> None:
    x = torch.zeros(2, 3, 4, 4)
    assert mse(torch.full_like(x, 3.0), torch.ones_like(x)) == 0.0  # both clamp to 1
    with pytest.raises(ValueError, match="shape"):
        fidelity(x, x[:1])
