"""Shared fixtures: tiny random diffusers models of every architecture the survey covers.

Each is saved as a bare model folder beside a ``scheduler/`` folder, so tests load it through the
same ``from_pretrained`` path that a downloaded hub model takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# CI has 2 cores shared by the test process and Ray workers: one intra-op thread keeps the tiny-model
# tests fast and avoids oversubscription.
torch.set_num_threads(1)

SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def _build(kind: str) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    if kind == "unet2d":
        return diffusers.UNet2DModel(
            sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, 32), norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
    if kind == "unet2d_condition":
        return diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    if kind == "dit":
        return diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
            num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
        )
    if kind == "pixart":
        return diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
            num_layers=2, sample_size=16, patch_size=2, cross_attention_dim=32,
            caption_channels=24, norm_type="ada_norm_single", use_additional_conditions=False,
        )
    raise ValueError(kind)


KINDS = ("unet2d", "unet2d_condition", "dit", "pixart")
ATTR = {"unet2d": "unet", "unet2d_condition": "unet", "dit": "transformer", "pixart": "transformer"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_model_dir(kind)`` -> path of a saved tiny model of that kind (built once per session)."""
    import json

    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            folder = root / kind
            _build(kind).save_pretrained(folder / ATTR[kind])
            (folder / "scheduler").mkdir(parents=True)
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
            built[kind] = folder / ATTR[kind]
        return built[kind]

    return get


def tiny_recipe(model_dir: Path, **overrides) -> dict:
    """A fast recipe dict for a tiny model: few steps, few samples, no FID."""
    recipe = {
        "model": str(model_dir),
        "sampler": {"scheduler": "ddim", "steps": 4},
        "quant": {"w_bits": 4, "a_bits": 8},
        "calibration_pool": {"samples": 4},
        "stages": [{"method": "uniform", "n_samples": 8}, {"method": "rtn"}],
        "eval": {"n_samples": 4, "batch_size": 4, "fid": False, "fidelity_samples": 4, "device": "cpu"},
    }
    recipe.update(overrides)
    return recipe
