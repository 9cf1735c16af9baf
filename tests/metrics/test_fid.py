"""FID through torch-fidelity: self-distance, growth with noise, the zoo reference, pass-through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity

from qsearch.metrics import fid as fid_module
from qsearch.metrics.fid import FIDReference, fid, get_reference, to_uint8
from qsearch.metrics.res9 import default_stats_path


def test_to_uint8_rounds_like_saved_images() -> None:
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5, -3.0]).view(1, 1, 1, 6)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255, 0]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([float("nan")]))


def test_fid_of_images_given_as_both_inputs_is_zero(cifar10_test) -> None:
    # Both inputs are image tensors: torch-fidelity extracts features and statistics of each.
    x = cifar10_test(64)
    assert abs(fid(x, reference=x.clone())) < 1e-3


def test_fid_is_zero_for_a_set_with_itself_and_grows_with_noise(cifar10_test) -> None:
    x = cifar10_test(500)
    reference = FIDReference.from_images(x)  # statistics computed once, by torch-fidelity
    assert abs(fid(x, reference=reference)) < 1e-3
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    values = [fid(x + s * noise, reference=reference) for s in (0.05, 0.2)]
    assert 0.5 < values[0] < values[1], values


def test_fid_against_zoo_reference_statistics(cifar10_test) -> None:
    # Measured on these 1,000 images: 5.02 (2.73 on 2,000, 1.02 on all 10,000). Wrong preprocessing
    # gives >= 19.8 on them: [0, 1] inputs 46.1, CIFAR mean/std normalization 19.8 or 36.3.
    value = fid(cifar10_test(1000))
    assert 0 < value < 10


def test_reference_resolved_once_and_written_as_torch_fidelity_cache(tmp_path: Path) -> None:
    try:
        path = default_stats_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    ref = get_reference(None, "res9-cifar10")
    assert get_reference(None, "res9-cifar10") is ref
    assert get_reference(str(path), "res9-cifar10").name == ref.name  # same content, same cache name
    kwargs = ref.torch_fidelity_kwargs("res9-cifar10")
    cached = Path(kwargs["cache_root"]) / f"{ref.name}-res9-cifar10-stat-fid-512.pt"
    stats = torch.load(cached, weights_only=False)
    with np.load(path) as npz:
        np.testing.assert_array_equal(stats["mu"], npz["mu"])
    with pytest.raises(RuntimeError, match="no images"):
        kwargs["input2"][0]  # the placeholder input is never meant to be read


@pytest.fixture
def fake_calculate_metrics(monkeypatch: pytest.MonkeyPatch) -> dict:
    seen: dict = {}

    def fake(**kwargs):
        seen.clear()
        seen.update(kwargs)
        return {torch_fidelity.KEY_METRIC_FID: 12.5}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake)
    return seen


def test_inception_fid_arguments_pass_through(fake_calculate_metrics: dict, tmp_path: Path) -> None:
    # Inception weights and CIFAR-10 downloads are unavailable here: check only what reaches torch-fidelity.
    seen = fake_calculate_metrics
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    value = fid(x, extractor="inception-v3-compat", batch_size=7, device="cpu", weights_path="/w/inception.pth")
    assert value == 12.5
    assert seen["fid"] is True and seen["feature_extractor"] == "inception-v3-compat"
    assert seen["input2"] == "cifar10-train" and "input2_cache_name" not in seen  # torch-fidelity caches it
    assert seen["batch_size"] == 7 and seen["cuda"] is False
    assert seen["feature_extractor_weights_path"] == "/w/inception.pth"
    assert len(seen["input1"]) == 4 and seen["input1"][0].dtype == torch.uint8
    assert seen["input1"][0].shape == (3, 64, 64)

    folder = tmp_path / "images"
    folder.mkdir()
    fid(x, extractor="inception-v3-compat", reference=folder, cache_root=tmp_path / "cache")
    assert seen["input2"] == str(folder) and seen["input2_cache_name"].startswith("qsearch-dir-")
    assert seen["cache_root"] == str(tmp_path / "cache")


def test_npz_reference_for_inception_matches_its_dtypes(fake_calculate_metrics: dict, tmp_path: Path) -> None:
    # torch-fidelity asserts equal mu dtypes: Inception features are float32, so the cached mu is too.
    npz = tmp_path / "stats.npz"
    np.savez(npz, mu=np.zeros(2048), sigma=np.eye(2048))
    fid([torch.zeros(2, 3, 8, 8), torch.ones(1, 3, 8, 8)], extractor="inception-v3-compat", reference=npz)
    seen = fake_calculate_metrics
    assert len(seen["input1"]) == 3
    cached = Path(seen["cache_root"]) / f"{seen['input2_cache_name']}-inception-v3-compat-stat-fid-2048.pt"
    stats = torch.load(cached, weights_only=False)
    assert stats["mu"].dtype == np.float32 and stats["sigma"].dtype == np.float64


def test_device_auto_and_errors(fake_calculate_metrics: dict) -> None:
    x = torch.rand(2, 3, 32, 32)
    fid(x, reference=x, device="auto")
    assert fake_calculate_metrics["cuda"] is torch.cuda.is_available()
    with pytest.raises(ValueError, match="at least 2"):
        fid(x[:1], reference=x)
    with pytest.raises(FileNotFoundError):
        fid(x, reference="/nonexistent/stats.npz")
    with pytest.raises(ValueError, match="no default"):
        fid(x, extractor="vgg16")
    assert fid_module.default_reference("inception-v3-compat") == "cifar10-train"
