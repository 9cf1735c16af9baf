"""The export folder: real bit widths on disk, faithful codes, pipelines, and the method stages' parts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.export.export_testing import SAMPLES, eps, quantize, recipe
from qsearch.export import ExportError, export_model, export_sampler, load
from qsearch.models import Denoiser
from qsearch.quant.quantizers import WeightQuantizer


def _weight_bytes(out: Path, config: dict, name: str) -> int:
    """Bytes of a layer's packed codes and of its weight quantizer's state in the weights file."""
    raw = load_file(str(next(out.glob("*/model.safetensors"))))
    keys = [config["layers"][name]["weight"]["codes"]]
    keys += [k for k in raw if k.startswith(f"{name}.weight_quantizer.")]
    return sum(raw[k].numel() * raw[k].element_size() for k in keys)


@pytest.mark.parametrize(
    ("kind", "quant"),
    [
        ("dit", {"w_bits": 4, "a_bits": None}),
        ("unet2d", {"w_bits": 3, "w_granularity": "group", "group_size": 16, "w_symmetric": False}),
        ("unet2d", {"w_bits": 5, "w_format": "fp", "a_bits": None}),
    ],
)
def test_weights_take_their_bit_width_on_disk(tiny_model_dir, tmp_path, kind, quant) -> None:
    """Per layer: params x bits / 8 for the codes, plus fp16 scales (and zero points), within 10%."""
    data = recipe(tiny_model_dir(kind), quant)
    _, ctx = quantize(data)
    out = export_model(ctx, tmp_path / "out", recipe=data)
    config = json.loads((out / "qsearch_config.json").read_text())
    for name, layer in ctx.layers().items():
        wq = layer.weight_quantizer
        params, bits = layer.weight.numel(), quant["w_bits"]
        codes = config["tensors"][config["layers"][name]["weight"]["codes"]]
        assert (codes["bits"], codes["count"]) == (bits, params)
        zero_points = 0 if quant.get("w_symmetric", True) else wq.scale.numel()
        expected = params * bits / 8 + wq.scale.numel() * 2 + zero_points
        assert _weight_bytes(out, config, name) <= 1.1 * expected
        assert _weight_bytes(out, config, name) >= math.ceil(params * bits / 8)


def test_an_existing_folder_is_not_overwritten(tiny_model_dir, tmp_path) -> None:
    data = recipe(tiny_model_dir("dit"), {"w_bits": 8, "a_bits": 8})
    _, ctx = quantize(data)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_model(ctx, tmp_path / "out", recipe=data)
    export_model(ctx, tmp_path / "out", recipe=data, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


class OffByOneQuantizer(WeightQuantizer):
    """A quantizer whose codes do not decode to what its forward computes."""

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return super().decode(torch.clamp(q + 1, max=2**self.bits - 1))


def test_codes_that_do_not_reproduce_the_layer_are_refused(tiny_model_dir, tmp_path) -> None:
    data = recipe(tiny_model_dir("dit"), {"w_bits": 4, "a_bits": None})
    _, ctx = quantize(data)
    name, layer = next(iter(ctx.layers().items()))
    broken = OffByOneQuantizer(layer.spec, layer.weight.shape)
    broken.load_state_dict(layer.weight_quantizer.state_dict())
    layer.weight_quantizer = broken
    with pytest.raises(ExportError, match=name):
        export_model(ctx, tmp_path / "out", recipe=data)
    assert not (tmp_path / "out").exists()


def test_pipeline_exports_and_loads_as_a_pipeline(tiny_model_dir, tmp_path) -> None:
    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(tiny_model_dir("unet2d"))
    scheduler = diffusers.DDPMScheduler.from_pretrained(tiny_model_dir("unet2d").parent / "scheduler")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    data = recipe(tmp_path / "pipe", {"w_bits": 6, "a_bits": None})
    _, ctx = quantize(data)
    pipe = load(export_model(ctx, tmp_path / "out", recipe=data), backend="fake")
    assert type(pipe).__name__ == "DDPMPipeline"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # the scheduler the trial sampled with
    assert torch.equal(eps(pipe.unet), eps(ctx.model))
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize(
    ("kind", "stages"),
    [
        # SVDQuant: a smoothing ``pre`` and a low-rank ``branch`` of its own classes; PTQD: a
        # corrector whose statistics are a dataclass of tensors.
        ("dit", [{"method": "uniform", "n_samples": 8}, {"method": "svdquant", "rank": 2, "alpha": 0.5},
                 {"method": "rtn"}, {"method": "ptqd"}]),
        # Q-Diffusion's split quantizers: subclasses with their own packed layout and extra state.
        ("unet2d", [{"method": "uniform", "n_samples": 8}, {"method": "qdiff_split"}, {"method": "rtn"}]),
    ],
)
def test_method_stages_parts_round_trip_bit_exactly(tiny_model_dir, tmp_path, kind, stages) -> None:
    data = recipe(tiny_model_dir(kind), {"w_bits": 4, "a_bits": 8}, stages=stages)
    session, ctx = quantize(data)
    samples = session.sampler.sample(ctx.denoiser, SAMPLES, seed=0, batch_size=SAMPLES,
                                     correctors=ctx.correctors)
    loaded = load(export_model(ctx, tmp_path / "out", recipe=data), backend="fake")
    assert torch.equal(eps(loaded), eps(ctx.model))
    assert [type(c) for c in loaded.qsearch_correctors] == [type(c) for c in ctx.correctors]
    again = export_sampler(loaded).sample(Denoiser(loaded), SAMPLES, seed=0, batch_size=SAMPLES,
                                          correctors=loaded.qsearch_correctors)
    assert torch.equal(again, samples)
