"""The zoo's ResNet-9: strict loading, weights lookup, classification, torch-fidelity registration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from qsearch.metrics import res9
from qsearch.zoo import find_zoo


@pytest.fixture(scope="module")
def weights() -> Path:
    try:
        return res9.default_weights_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_loads_strictly(weights: Path) -> None:
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    model = res9.load_res9(weights)  # load_state_dict(strict=True) inside
    assert set(model.state_dict()) == keys
    assert not model.training
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_weights_path_from_env(weights: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(res9.WEIGHTS_ENV, str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="QSEARCH_RES9"):
        res9.default_weights_path()
    monkeypatch.setenv(res9.WEIGHTS_ENV, str(weights))
    assert res9.default_weights_path() == weights


def test_find_zoo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "shared" / "zoo").mkdir(parents=True)
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.delenv("QSEARCH_ZOO", raising=False)
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert find_zoo() == tmp_path / "shared" / "zoo"  # ../../shared/zoo
    monkeypatch.setenv("QSEARCH_ZOO", str(tmp_path / "elsewhere"))
    assert find_zoo() == tmp_path / "elsewhere"


def test_classifies_cifar10_in_minus_one_one(weights: Path, cifar10_test) -> None:
    # The README's 90.5 % test accuracy holds for inputs in [-1, 1]; [0, 1] inputs drop to ~74 %.
    images, labels = cifar10_test(200, labels=True)
    model = res9.load_res9(weights)
    with torch.no_grad():
        accuracy = (model.logits(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.82


def test_registered_with_torch_fidelity(weights: Path) -> None:
    assert FEATURE_EXTRACTORS_REGISTRY[res9.NAME] is res9.Res9FeatureExtractor
    res9.register()  # idempotent
    fe = res9.Res9FeatureExtractor(res9.NAME, ["512", "logits"], feature_extractor_weights_path=str(weights))
    feats, logits = fe(torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    assert feats.shape == (3, 512) and logits.shape == (3, 10)
    assert feats.dtype == torch.float64  # matches the float64 reference statistics
    with pytest.raises(TypeError):
        fe(torch.zeros(3, 3, 32, 32))
    with pytest.raises(ValueError, match="32"):
        fe(torch.zeros(3, 3, 64, 64, dtype=torch.uint8))
