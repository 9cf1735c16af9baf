"""Sampling: the reverse-diffusion loop, seeded per sample, with pluggable error correction.

Seeds are per sample (sample ``i`` starts from noise seeded ``seed + i``), so the FP model and every
quantized model start from the same noise: fidelity metrics compare like with like, and a sample
set does not depend on the batch size. The scheduler's step is wrapped by the error correctors of a
recipe (PTQD, D2-DPM, ...), each of which receives the next step function and returns its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from qsearch.models import Denoiser, LoadedModel

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


class SamplerConfig(BaseModel):
    """How samples are drawn: scheduler, number of steps, conditioning."""

    model_config = ConfigDict(extra="forbid")

    scheduler: Literal["ddim", "ddpm", "dpm_solver", "euler", "model"] = Field(
        "ddim", description="diffusers scheduler; 'model' keeps the one saved with the model"
    )
    steps: int = Field(50, ge=1, le=1000)
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity (0: deterministic)")
    guidance_scale: float = Field(1.0, ge=0.0, description="classifier-free guidance (1: off)")
    prompts: list[str] = Field(
        default_factory=lambda: ["a photograph of an astronaut riding a horse"],
        description="text prompts for text-conditional models, cycled over the samples",
    )


class StepFn(Protocol):
    """One reverse step: ``x_prev = step(eps, t, x)``."""

    def __call__(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Trajectory:
    """Denoiser inputs along the sampling trajectory of a few samples (the calibration pool).

    ``xs[k]`` is the batch of noisy inputs at ``timesteps[k]``; ``cond`` is per sample.
    """

    xs: torch.Tensor  # (T, N, C, H, W)
    timesteps: torch.Tensor  # (T,)
    cond: dict[str, torch.Tensor]

    @property
    def num_steps(self) -> int:
        return self.xs.shape[0]

    @property
    def num_samples(self) -> int:
        return self.xs.shape[1]


class Sampler:
    """Draws samples from a denoiser with a diffusers scheduler."""

    def __init__(self, loaded: LoadedModel, config: SamplerConfig) -> None:
        import diffusers

        self.config = config
        self.loaded = loaded
        sched_cfg = dict(loaded.scheduler_config)
        cls_name = sched_cfg.get("_class_name", "DDPMScheduler")
        if config.scheduler != "model":
            cls_name = SCHEDULERS[config.scheduler]
        self.scheduler = getattr(diffusers, cls_name).from_config(sched_cfg)
        self.scheduler.set_timesteps(config.steps)
        self.timesteps = self.scheduler.timesteps.clone()
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    # conditioning ---------------------------------------------------------------------------
    def conditioning(self, model: torch.nn.Module, index: torch.Tensor) -> tuple[dict, dict | None]:
        """Per-sample conditioning for sample indices: class-balanced labels or prompt embeddings."""
        cfg = model.config
        name = type(model).__name__
        if name == "DiTTransformer2DModel" or getattr(cfg, "num_class_embeds", None):
            num_classes = getattr(cfg, "num_embeds_ada_norm", None) or cfg.num_class_embeds
            labels = index % num_classes
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, num_classes)}
        if name in ("UNet2DConditionModel", "PixArtTransformer2DModel"):
            prompts = [self.config.prompts[int(i) % len(self.config.prompts)] for i in index]
            emb = self.encode_prompts(model, prompts)
            null = self.encode_prompts(model, [""] * len(prompts))
            return {"encoder_hidden_states": emb}, {"encoder_hidden_states": null}
        return {}, None

    def encode_prompts(self, model: torch.nn.Module, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings from the pipeline's text encoder when there is one.

        A bare model folder has no text encoder; then each prompt maps to a fixed pseudo-random
        embedding (seeded by the prompt's hash), which keeps different prompts different, the
        property that the tests of text conditioning need.
        """
        pipe = self.loaded.pipeline
        if pipe is not None and hasattr(pipe, "encode_prompt") and getattr(pipe, "text_encoder", None):
            out = pipe.encode_prompt(list(prompts), device=pipe.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
            return out[0] if isinstance(out, tuple) else out
        cfg = model.config
        dim = getattr(cfg, "caption_channels", None) or getattr(cfg, "cross_attention_dim", None)
        tokens = 8
        embs = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little")
            g = torch.Generator().manual_seed(seed)
            embs.append(torch.randn(tokens, dim, generator=g))
        return torch.stack(embs)

    # sampling ---------------------------------------------------------------------------------
    def initial_noise(self, model: torch.nn.Module, index: torch.Tensor, seed: int) -> torch.Tensor:
        """Noise for each sample index, seeded ``seed + index`` (independent of batching)."""
        cfg = model.config
        size = cfg.sample_size
        shape = (cfg.in_channels, size, size) if isinstance(size, int) else (cfg.in_channels, *size)
        noise = [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed + int(i)))
            for i in index
        ]
        return torch.stack(noise) * self.scheduler.init_noise_sigma

    def base_step(self, generator: torch.Generator | None) -> StepFn:
        """The scheduler's own step."""
        kwargs: dict[str, Any] = {"generator": generator}
        if self.config.scheduler == "ddim":
            kwargs["eta"] = self.config.eta

        def step(eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self.scheduler.step(eps, t, x, **kwargs).prev_sample

        return step

    def sample_batch(
        self,
        denoiser: Denoiser,
        index: torch.Tensor,
        seed: int,
        *,
        correctors: Sequence[Any] = (),
        record: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Samples for the given indices (images in [-1, 1]); optionally the inputs at each step."""
        device = denoiser.device
        dtype = next(denoiser.model.parameters()).dtype
        cond, uncond = self.conditioning(denoiser.model, index)
        cond = {k: v.to(device) for k, v in cond.items()}
        uncond = {k: v.to(device) for k, v in uncond.items()} if uncond else None
        x = self.initial_noise(denoiser.model, index, seed).to(device, dtype)
        generator = torch.Generator(device).manual_seed(seed + int(index[0]) + 1_000_003)
        self.scheduler.set_timesteps(self.config.steps)
        step: StepFn = self.base_step(generator)
        for corrector in correctors:
            step = corrector.wrap(step, self)
        recorded = []
        for t in self.scheduler.timesteps:
            model_in = self.scheduler.scale_model_input(x, t)
            if record:
                recorded.append(model_in.detach().cpu())
            eps = denoiser(model_in, t.to(device), cond, uncond, self.config.guidance_scale)
            x = step(eps.to(x.dtype), t, x)
        images = self.decode(x)
        return images, (torch.stack(recorded) if record else None)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]: pixel-space models as they are, latent models through their VAE."""
        vae = self.loaded.vae
        if vae is None:
            return x.clamp(-1, 1)
        latents = x / vae.config.scaling_factor
        return vae.decode(latents.to(next(vae.parameters()).dtype)).sample.clamp(-1, 1)

    def batches(self, n: int, batch_size: int) -> Iterator[torch.Tensor]:
        """Sample indices ``0..n-1`` in batches."""
        for start in range(0, n, batch_size):
            yield torch.arange(start, min(n, start + batch_size))

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        n: int,
        *,
        seed: int = 0,
        batch_size: int = 64,
        correctors: Sequence[Any] = (),
        autocast: torch.dtype | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """``n`` samples as a CPU float tensor in [-1, 1]."""
        out = []
        device_type = denoiser.device.type
        for index in self.batches(n, batch_size):
            with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
                images, _ = self.sample_batch(denoiser, index, seed, correctors=correctors)
            out.append(images.float().cpu())
            if progress:
                progress(len(index))
        return torch.cat(out)

    @torch.no_grad()
    def trajectory(self, denoiser: Denoiser, n: int, *, seed: int, batch_size: int = 64) -> Trajectory:
        """The FP model's denoiser inputs at every step for ``n`` samples (calibration pool)."""
        xs, conds = [], []
        for index in self.batches(n, batch_size):
            _, rec = self.sample_batch(denoiser, index, seed, record=True)
            xs.append(rec)
            conds.append(self.conditioning(denoiser.model, index)[0])
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]} if conds and conds[0] else {}
        timesteps = self.scheduler.timesteps.clone()
        return Trajectory(torch.cat(xs, dim=1), timesteps, cond)

