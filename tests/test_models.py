"""Model loading (pipeline, component and bare folders, as hub ids load) and the Denoiser."""

from __future__ import annotations

import pytest
import torch

from qsearch.models import Denoiser, family, load_model, resolve_ref
from qsearch.zoo import find_zoo

ZOO = find_zoo()
needs_zoo = pytest.mark.skipif(ZOO is None, reason="reference zoo not found (set QSEARCH_ZOO)")


@needs_zoo
def test_pipeline_folder_loads_like_a_hub_id() -> None:
    loaded = load_model("zoo:ddpm-cifar10")
    assert type(loaded.denoiser).__name__ == "UNet2DModel"
    assert loaded.pipeline is not None and loaded.scheduler_config["num_train_timesteps"] == 1000


@needs_zoo
def test_component_folder_without_model_index_loads() -> None:
    loaded = load_model("zoo:dit-cifar10")
    assert type(loaded.denoiser).__name__ == "DiTTransformer2DModel"
    assert loaded.scheduler_config["beta_schedule"] == "linear"


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition", "dit", "pixart"])
def test_bare_model_folders_load_and_denoise(tiny_model_dir, kind: str) -> None:
    loaded = load_model(str(tiny_model_dir(kind)))
    den = Denoiser(loaded.denoiser)
    cfg = loaded.denoiser.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    cond = {}
    if kind == "dit":
        cond = {"class_labels": torch.tensor([1, 2])}
    elif kind in ("unet2d_condition", "pixart"):
        dim = getattr(cfg, "caption_channels", None) or cfg.cross_attention_dim
        cond = {"encoder_hidden_states": torch.randn(2, 8, dim)}
    with torch.no_grad():
        eps = den(x, torch.tensor(500), cond)
    assert eps.shape == x.shape  # PixArt's learned variance channels are dropped


def test_unknown_zoo_name_and_unsupported_model() -> None:
    with pytest.raises(FileNotFoundError):
        resolve_ref("zoo:no-such-model")
    with pytest.raises(TypeError, match="unsupported denoiser"):
        family(torch.nn.Linear(2, 2))


def test_hub_ids_pass_through_unchanged() -> None:
    assert resolve_ref("google/ddpm-cifar10-32") == "google/ddpm-cifar10-32"


def test_guidance_combines_conditional_and_unconditional(tiny_model_dir) -> None:
    den = Denoiser(load_model(str(tiny_model_dir("dit"))).denoiser)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor(300)
    cond, uncond = {"class_labels": torch.tensor([3, 4])}, {"class_labels": torch.tensor([10, 10])}
    with torch.no_grad():
        e_c, e_u = den(x, t, cond), den(x, t, uncond)
        guided = den(x, t, cond, uncond, guidance_scale=3.0)
    assert torch.allclose(guided, e_u + 3.0 * (e_c - e_u), atol=1e-5)
