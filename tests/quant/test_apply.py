"""quantize_ and layer plans: overrides by glob, full-precision layers, shared parameters."""

from __future__ import annotations

import torch
from torch import nn

from qsearch.quant import FULL_PRECISION, LayerPlan, QuantSpec, quant_layers, quantize_
from qsearch.quant.bits import bits_report


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def test_overrides_change_only_named_fields_and_keep_fp_wins() -> None:
    plan = LayerPlan(default=QuantSpec(w_bits=4, a_bits=8), overrides={"2": {"w_bits": 3}}, keep_fp=["4"])
    specs = plan.resolve(_model())
    assert specs["0"].w_bits == 4 and specs["2"].w_bits == 3 and specs["2"].a_bits == 8
    assert specs["4"] == FULL_PRECISION


def test_the_first_matching_override_decides() -> None:
    plan = LayerPlan(default=QuantSpec(w_bits=4), overrides={"2": {"w_bits": 3}, "*": {"w_bits": 8}})
    assert [plan.pattern_for(n) for n in ("2", "0")] == ["2", "*"]
    assert plan.spec_for("2").w_bits == 3 and plan.spec_for("0").w_bits == 8
    assert LayerPlan().pattern_for("0") is None


def test_unmatched_patterns_are_reported() -> None:
    plan = LayerPlan(overrides={"down_blocks.*": {"w_bits": 3}})
    assert plan.unmatched_patterns(_model()) == ["down_blocks.*"]


def test_quantize_swaps_layers_sharing_parameters() -> None:
    model = _model()
    weight = model[0].weight
    quantize_(model, LayerPlan(keep_fp=["4"]).resolve(model))
    layers = quant_layers(model)
    assert set(layers) == {"0", "2"}
    assert layers["0"].weight is weight and isinstance(layers["0"], nn.Conv2d)
    assert type(model[4]) is nn.Linear


def test_uncalibrated_model_with_quant_disabled_equals_fp() -> None:
    model = _model()
    x = torch.randn(2, 3, 4, 4)
    ref = model(x)
    quantize_(model, LayerPlan().resolve(model))
    for layer in quant_layers(model).values():
        layer.quant_enabled = False
    assert torch.equal(model(x), ref)


def test_weight_cache_invalidated_by_in_place_edit() -> None:
    model = _model()
    quantize_(model, LayerPlan().resolve(model))
    layer = model[0]
    layer.weight_quantizer.init_minmax(layer.weight)
    with torch.no_grad():
        first = layer.quantized_weight().clone()
        layer.weight.mul_(2)
        layer.weight_quantizer.init_minmax(layer.weight)
        assert torch.allclose(layer.quantized_weight(), first * 2, atol=1e-5)


def test_bits_report_weighs_by_parameter_count() -> None:
    model = _model()
    plan = LayerPlan(default=QuantSpec(w_bits=4), overrides={"4": {"w_bits": 8}})
    quantize_(model, plan.resolve(model))
    report = bits_report(model)
    n = [model[i].weight.numel() for i in (0, 2, 4)]
    assert abs(report.avg_weight_bits - (4 * (n[0] + n[1]) + 8 * n[2]) / sum(n)) < 1e-9
    channels = 8 + 8 + 10  # one fp16 scale per output channel (symmetric), one bias each
    act_qparams = 3 * 2  # scale and zero point of each layer's input quantizer
    expected = (4 * (n[0] + n[1]) + 8 * n[2]) / 8 + 2 * channels + 2 * act_qparams + 2 * channels
    assert report.model_bytes == expected
    assert bits_report(_model()).avg_weight_bits == 16
