"""``benchmarks/random_model.py``: a hub architecture with random weights, loaded like a local model."""

from __future__ import annotations

import pytest

from benchmarks.random_model import ARCHITECTURES, main, write_random_model
from qsearch.models import load_model

TINY = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "sample_size": 8}


def test_written_folder_loads_with_the_architecture_and_scheduler(tmp_path) -> None:
    write_random_model("dit-xl-2-256", tmp_path / "m", TINY)
    loaded = load_model(str(tmp_path / "m"))
    config = loaded.denoiser.config
    assert type(loaded.denoiser).__name__ == "DiTTransformer2DModel"
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (1, 2, 8)
    # fields not overridden are the hub model's
    assert config.out_channels == ARCHITECTURES["dit-xl-2-256"]["config"]["out_channels"] == 8
    assert loaded.scheduler_config["_class_name"] == "DDIMScheduler"
    assert loaded.scheduler_config["num_train_timesteps"] == 1000


def test_same_seed_same_weights(tmp_path) -> None:
    a = load_model(str(write_random_model("dit-xl-2-256", tmp_path / "a", TINY, seed=1))).denoiser
    b = load_model(str(write_random_model("dit-xl-2-256", tmp_path / "b", TINY, seed=1))).denoiser
    c = load_model(str(write_random_model("dit-xl-2-256", tmp_path / "c", TINY, seed=2))).denoiser
    pa, pb, pc = (next(m.transformer_blocks[0].ff.parameters()) for m in (a, b, c))
    assert pa.equal(pb) and not pa.equal(pc)


def test_bad_names_are_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown architecture 'dit-xxl'"):
        write_random_model("dit-xxl", tmp_path / "x")
    with pytest.raises(ValueError, match="no config field.*num_layer\\b"):
        write_random_model("dit-xl-2-256", tmp_path / "x", {"num_layer": 1})


def test_command_line_overrides(tmp_path, capsys) -> None:
    assert main(["dit-xl-2-256", str(tmp_path / "m"), *[f"--set={k}={v}" for k, v in TINY.items()]]) == 0
    assert "1 layers" in capsys.readouterr().out
