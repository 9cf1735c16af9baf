"""Sampling: per-sample seeds, conditioning, trajectories, the corrector chain."""

from __future__ import annotations

import torch

from qsearch.models import Denoiser, load_model
from qsearch.sampling import Sampler, SamplerConfig


def _sampler(tiny_model_dir, kind: str = "unet2d", **cfg) -> tuple[Sampler, Denoiser]:
    loaded = load_model(str(tiny_model_dir(kind)))
    return Sampler(loaded, SamplerConfig(steps=3, **cfg)), Denoiser(loaded.denoiser)


def test_samples_do_not_depend_on_batch_size(tiny_model_dir) -> None:
    sampler, den = _sampler(tiny_model_dir)
    a = sampler.sample(den, 5, seed=7, batch_size=5)
    b = sampler.sample(den, 5, seed=7, batch_size=2)
    assert torch.allclose(a, b, atol=1e-5)
    c = sampler.sample(den, 5, seed=8, batch_size=5)
    assert not torch.allclose(a, c)


def test_trajectory_records_every_step_input(tiny_model_dir) -> None:
    sampler, den = _sampler(tiny_model_dir, "dit")
    traj = sampler.trajectory(den, 4, seed=0, batch_size=3)
    assert traj.xs.shape == (3, 4, 3, 16, 16)
    assert torch.equal(traj.timesteps, sampler.timesteps)
    assert traj.cond["class_labels"].tolist() == [0, 1, 2, 3]  # class-balanced labels
    first = sampler.initial_noise(den.model, torch.arange(4), 0)
    assert torch.allclose(traj.xs[0], first)


def test_different_prompts_give_different_embeddings(tiny_model_dir) -> None:
    sampler, den = _sampler(tiny_model_dir, "pixart", prompts=["a cat", "a dog"])
    cond, uncond = sampler.conditioning(den.model, torch.arange(2))
    emb = cond["encoder_hidden_states"]
    assert emb.shape[-1] == den.model.config.caption_channels
    assert not torch.allclose(emb[0], emb[1]) and uncond is not None


def test_correctors_wrap_the_step_in_order(tiny_model_dir) -> None:
    sampler, den = _sampler(tiny_model_dir)
    calls: list[str] = []

    class Tag:
        def __init__(self, name: str) -> None:
            self.name = name

        def wrap(self, step, _sampler):
            def wrapped(eps, t, x):
                calls.append(self.name)
                return step(eps, t, x)
            return wrapped

    sampler.sample(den, 1, correctors=[Tag("inner"), Tag("outer")])
    assert calls[:2] == ["outer", "inner"] and len(calls) == 2 * 3
