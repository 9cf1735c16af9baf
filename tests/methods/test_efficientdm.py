"""EfficientDM / QA-LoRA / IntLoRA: merged adapters compute what the unmerged adapters computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.efficientdm import GroupLoRAQuantizer, IntLoRAQuantizer, QALoRAQuantizer, ZeroPointQuantizer
from methods.lsq import TemporalActQuantizer
from qsearch.engine import Session
from qsearch.quant.modules import QuantConv2d, QuantLinear
from qsearch.quant.quantizers import WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.recipe import parse_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the shared test machine is slower with oversubscribed threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(kind: str, spec: QuantSpec) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        layer = QuantConv2d.from_float(nn.Conv2d(6, 8, 3, padding=1), spec)
    else:
        layer = QuantLinear.from_float(nn.Linear(12, 8), spec)
    layer.weight_quantizer.init_minmax(layer.weight.detach())
    layer.act_quantizer.set_range(torch.tensor(-3.0), torch.tensor(3.0))
    return layer


def _input(kind: str) -> torch.Tensor:
    return torch.randn(2, 6, 5, 5) if kind == "conv" else torch.randn(2, 4, 12)


def _randomize(*params: nn.Parameter) -> None:
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_qalora_merge_gives_the_unmerged_output(kind: str) -> None:
    layer = _layer(kind, QuantSpec(w_bits=4, a_bits=8))
    wq = QALoRAQuantizer.from_layer(layer, rank=4)
    _randomize(wq.lora_b, wq.scale)
    layer.weight_quantizer = wq
    wq.round_scales()  # merging stores fp16 step sizes; the unmerged reference uses the same
    x = _input(kind)
    with torch.no_grad():
        unmerged = layer(x)
        layer.weight_quantizer = wq.merge(layer)
        merged = layer(x)
    assert type(layer.weight_quantizer) is WeightQuantizer
    assert torch.equal(merged, unmerged)


def test_qalora_gradients_reach_adapters_and_step_sizes() -> None:
    layer = _layer("conv", QuantSpec(w_bits=4, a_bits=8))
    wq = QALoRAQuantizer.from_layer(layer, rank=4)
    _randomize(wq.lora_b)
    layer.weight_quantizer = wq
    layer(_input("conv")).square().sum().backward()
    assert wq.lora_a.grad.abs().sum() > 0 and wq.lora_b.grad.abs().sum() > 0
    assert wq.scale.grad.abs().sum() > 0


def test_qa_lora_merges_into_group_zero_points() -> None:
    spec = QuantSpec(w_bits=4, a_bits=8, w_granularity="group", group_size=9, w_symmetric=False)
    layer = _layer("conv", spec)
    wq = GroupLoRAQuantizer.from_layer(layer, rank=2)
    _randomize(wq.lora_a, wq.lora_b)
    layer.weight_quantizer = wq
    x = _input("conv")
    with torch.no_grad():
        adapted = wq(layer.weight)
        unmerged = layer(x)
        merged_q = wq.merge(layer)
        layer.weight_quantizer = merged_q
        merged = layer(x)
    assert isinstance(merged_q, ZeroPointQuantizer) and not merged_q.symmetric
    # codes are unchanged: the adapter lives entirely in the zero points
    assert torch.equal(merged_q.encode(layer.weight), wq.codes)
    offsets = (adapted - wq.decode(wq.codes)).reshape(8, 6, 9)
    assert torch.allclose(offsets, offsets[..., :1].expand_as(offsets), atol=1e-6)  # one per group
    # exact up to storing the merged zero points in fp16
    assert torch.allclose(merged, unmerged, atol=1e-3 * float(unmerged.abs().max()))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_intlora_merge_lands_on_the_integer_grid(kind: str) -> None:
    layer = _layer(kind, QuantSpec(w_bits=4, a_bits=8))
    wq = IntLoRAQuantizer(layer.spec, layer.weight, rank=2, lora_bits=8, alpha=1.5,
                          generator=torch.Generator().manual_seed(0))
    _randomize(wq.lora_a, wq.lora_b)
    layer.weight_quantizer = wq
    x = _input(kind)
    with torch.no_grad():
        unmerged = layer(x)
        merged_q = wq.merge(layer)
        layer.weight_quantizer = merged_q
        merged = layer(x)
    codes = layer.weight.detach().reshape(8, -1) / merged_q.scale.view(8, 1)
    assert torch.equal(codes, codes.round())  # merged weight = fp16 step x integer code
    assert torch.equal(merged_q.scale, merged_q.scale.half().float())
    assert codes.abs().max() <= 2 ** (merged_q.bits - 1) - 1
    assert torch.equal(merged_q.decode(merged_q.encode(layer.weight)), layer.weight.detach())
    assert torch.allclose(merged, unmerged, atol=1e-6)


def test_efficientdm_stage_trains_and_leaves_plain_layers(tiny_model_dir) -> None:
    recipe = parse_recipe({
        "model": str(tiny_model_dir("unet2d")),
        "sampler": {"scheduler": "ddim", "steps": 4},
        "quant": {"w_bits": 4, "a_bits": 4},
        "calibration_pool": {"samples": 4},
        "stages": [{"method": "uniform", "n_samples": 8}, {"method": "rtn"},
                   {"method": "efficientdm", "steps": 16, "batch_size": 4, "rank": 4, "lora_lr": 1e-3,
                    "scale_lr": 1e-4, "act_lr": 1e-2}],
        "eval": {"n_samples": 2, "batch_size": 2, "fid": False, "fidelity_samples": 0, "device": "cpu"},
    })
    session = Session(recipe)
    ctx = session.quantize(recipe)
    curve = ctx.state["loss_curves"]["efficientdm"]
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4
    layers = ctx.layers()
    assert all(type(m.weight_quantizer) is WeightQuantizer for m in layers.values())
    temporal = [m.act_quantizer for m in layers.values() if isinstance(m.act_quantizer, TemporalActQuantizer)]
    assert temporal and all(q.scale.shape == (4,) for q in temporal)
    assert any(not torch.allclose(q.scale, q.scale[:1].expand(4)) for q in temporal)  # per-step scales moved
    assert session.evaluate(ctx, recipe)["avg_weight_bits"] == 4.0

    # gradient checkpointing recomputes blocks outside the denoiser call: same training
    def curve(checkpointing: bool) -> list[float]:
        stage = {**recipe.stages[2].model_dump(), "steps": 2, "gradient_checkpointing": checkpointing}
        r = parse_recipe({**recipe.model_dump(exclude={"stages"}), "stages": [
            {"method": "uniform", "n_samples": 8}, {"method": "rtn"}, stage]})
        return session.quantize(r).state["loss_curves"]["efficientdm"]

    assert curve(True) == curve(False)

    intlora = parse_recipe({**recipe.model_dump(exclude={"stages"}), "stages": [
        {"method": "uniform", "n_samples": 8}, {"method": "rtn"},
        {"method": "intlora", "steps": 3, "batch_size": 2, "lora_bits": 4}]})
    ctx = session.quantize(intlora)
    assert len(ctx.state["loss_curves"]["intlora"]) == 3
    bits = session.evaluate(ctx, intlora)["avg_weight_bits"]
    assert 4.0 < bits <= 8.0  # merged codes U_int * W_int need more than the 4 weight bits
