"""Write a diffusers model folder with random weights in the architecture of a hub model.

Speed and memory do not depend on the weights' values, and the hub is unreachable from the GPU
machine: this gives the export benchmark a denoiser of the size users ship (DiT-XL/2 at 256 px, 675 M
parameters) next to the zoo's 10 M-parameter DiT. The folder is a transformer/ + scheduler/ pair,
loaded like any local model (``benchmarks/export_bench.py --models DIR``). Its samples are noise:
no FID is measured on it.

    python benchmarks/random_model.py dit-xl-2-256 /tmp/dit-xl        # then --models /tmp/dit-xl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml

# facebook/DiT-XL-2-256's transformer/config.json and scheduler/scheduler_config.json (diffusers)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "dit-xl-2-256": {
        "class": "DiTTransformer2DModel",
        "config": {
            "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
            "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False, "norm_eps": 1e-5,
            "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
            "num_embeds_ada_norm": 1000, "num_layers": 28, "out_channels": 8, "patch_size": 2,
            "sample_size": 32, "upcast_attention": False,
        },
        "scheduler": {
            "class": "DDIMScheduler",
            "config": {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                       "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": True,
                       "steps_offset": 0, "prediction_type": "epsilon"},
        },
    },
}


def write_random_model(name: str, out: Path, overrides: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Write ``out/transformer`` (random weights, ``name``'s config with ``overrides``) and ``out/scheduler``."""
    import diffusers

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    config = {**arch["config"], **(overrides or {})}
    unknown = set(config) - set(arch["config"])
    if unknown:
        raise ValueError(f"{name} has no config field(s) {', '.join(sorted(unknown))}")
    torch.manual_seed(seed)
    model = getattr(diffusers, arch["class"])(**config)
    model.save_pretrained(out / "transformer")
    scheduler = getattr(diffusers, arch["scheduler"]["class"])(**arch["scheduler"]["config"])
    scheduler.save_pretrained(out / "scheduler")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=list(ARCHITECTURES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field (e.g. num_layers=2 for a quick check)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    out = write_random_model(args.architecture, args.out, overrides)
    config = json.loads((out / "transformer" / "config.json").read_text())
    print(f"wrote {out} ({config['_class_name']}, {config['num_layers']} layers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
