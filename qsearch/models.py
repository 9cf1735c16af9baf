"""Loading diffusers models and calling their denoisers in one way.

A recipe names a model the way diffusers does: a hub id (``google/ddpm-cifar10-32``), a pipeline
folder (``model_index.json``), or a bare model folder (``config.json`` with ``_class_name``). The
``zoo:`` prefix names a folder of the reference zoo (``zoo:ddpm-cifar10``), found through
``$QSEARCH_ZOO`` or a ``shared/zoo`` folder beside the project. Everything is loaded with
``from_pretrained`` exactly as a hub id would be.

``Denoiser`` hides the differences between U-Nets and transformers (argument names, learned-sigma
outputs, class or text conditioning, classifier-free guidance), so methods see one signature:
``eps = denoiser(x_t, t, cond)``.
"""

from __future__ import annotations

import contextvars
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qsearch.zoo import zoo_path

DENOISER_ATTRS = ("unet", "transformer")
SUPPORTED = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel")

# The timestep of the denoiser call in progress, for timestep-aware quantizers (TDQ, APQ-DM).
current_timestep: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "current_timestep", default=None
)


def resolve_ref(ref: str) -> str:
    """A local path for ``zoo:NAME`` and existing folders; anything else is passed on as a hub id."""
    if ref.startswith("zoo:"):
        return str(zoo_path(ref[4:]))
    return ref


@dataclass
class LoadedModel:
    """A denoiser with what sampling needs around it (scheduler config, VAE, conditioning)."""

    denoiser: nn.Module
    scheduler_config: dict[str, Any]
    source: str
    vae: nn.Module | None = None
    pipeline: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


def load_model(ref: str, *, variant: str | None = None, torch_dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a pipeline folder, component folder, bare model folder or hub id."""
    import diffusers

    path = resolve_ref(ref)
    local = Path(path)
    kwargs: dict[str, Any] = {}
    if variant:
        kwargs["variant"] = variant
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if local.is_dir() and (local / "config.json").exists():
        cls_name = json.loads((local / "config.json").read_text()).get("_class_name")
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise ValueError(f"{ref}: unknown diffusers class {cls_name!r}")
        model = cls.from_pretrained(path, **kwargs)
        sched = local.parent / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(sched.read_text()) if sched.exists() else {}
        return LoadedModel(model, scheduler_config, ref)
    if local.is_dir() and not (local / "model_index.json").exists():
        # A folder of components without model_index.json (e.g. transformer/ + scheduler/).
        for attr in DENOISER_ATTRS:
            if (local / attr / "config.json").exists():
                loaded = load_model(str(local / attr), variant=variant, torch_dtype=torch_dtype)
                loaded.source = ref
                return loaded
        raise FileNotFoundError(f"{ref}: no model_index.json, config.json, unet/ or transformer/")
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, **kwargs)
    denoiser = next((getattr(pipe, a) for a in DENOISER_ATTRS if getattr(pipe, a, None) is not None), None)
    if denoiser is None:
        raise ValueError(f"{ref}: pipeline {type(pipe).__name__} has no unet or transformer")
    return LoadedModel(
        denoiser, dict(pipe.scheduler.config), ref, vae=getattr(pipe, "vae", None), pipeline=pipe
    )


def family(model: nn.Module) -> str:
    """The denoiser family, which fixes how it is called."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise TypeError(f"unsupported denoiser {name}; supported: {', '.join(SUPPORTED)}")
    return name


class Denoiser:
    """Calls a diffusers denoiser as ``eps = denoiser(x_t, t, cond)``.

    ``cond`` holds the model's conditioning keyword arguments (``class_labels`` or
    ``encoder_hidden_states``); with ``guidance_scale > 1`` and an ``uncond`` of the same form,
    classifier-free guidance runs both halves in one batch.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.family = family(model)
        self.in_channels = model.config.in_channels

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One unguided call; returns the noise prediction (learned variance dropped)."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        token = current_timestep.set(t)
        try:
            if self.family == "UNet2DModel":
                out = self.model(x, t).sample
            elif self.family == "UNet2DConditionModel":
                out = self.model(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
            elif self.family == "DiTTransformer2DModel":
                out = self.model(x, timestep=t, class_labels=cond["class_labels"]).sample
            else:  # PixArtTransformer2DModel
                out = self.model(
                    x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                ).sample
        finally:
            current_timestep.reset(token)
        if out.shape[1] == 2 * self.in_channels:
            out = out[:, : self.in_channels]
        return out

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor] | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        if uncond is None or guidance_scale == 1.0:
            return self.forward(x, t, cond)
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        tt = t.expand(x.shape[0]) if t.dim() == 0 else t
        eps_c, eps_u = self.forward(torch.cat([x, x]), torch.cat([tt, tt]), both).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)


Conditioner = Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]]
