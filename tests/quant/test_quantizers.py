"""Weight and activation quantizers: granularity, STE gradients, static/dynamic ranges."""

from __future__ import annotations

import pytest
import torch

from qsearch.quant import ActQuantizer, QuantSpec, WeightQuantizer


def _error(spec: QuantSpec, w: torch.Tensor) -> float:
    wq = WeightQuantizer(spec, w.shape)
    wq.init_minmax(w)
    return (wq(w) - w).pow(2).mean().item()


def test_grouped_beats_per_channel_beats_per_tensor() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.logspace(-2, 0, 256)  # input channels of very different ranges
    tensor = _error(QuantSpec(w_bits=4, w_granularity="tensor"), w)
    channel = _error(QuantSpec(w_bits=4, w_granularity="channel"), w)
    group = _error(QuantSpec(w_bits=4, w_granularity="group", group_size=32), w)
    assert group < channel < tensor


def test_each_group_has_its_own_scale() -> None:
    w = torch.randn(8, 64)
    w[:, :32] *= 100
    wq = WeightQuantizer(QuantSpec(w_bits=4, w_granularity="group", group_size=32), w.shape)
    wq.init_minmax(w)
    assert wq.scale.shape == (8, 2, 1)
    assert (wq.scale[:, 0] > 10 * wq.scale[:, 1]).all()


def test_encode_decode_equals_fake_quant_exactly() -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 8, 3, 3)
    for spec in (QuantSpec(w_bits=3, w_symmetric=False), QuantSpec(w_bits=5, w_granularity="group", group_size=24),
                 QuantSpec(w_bits=4, w_format="fp")):
        wq = WeightQuantizer(spec, w.shape)
        wq.init_minmax(w)
        assert torch.equal(wq.decode(wq.encode(w)), wq(w))


def test_ste_gradients_reach_weight_and_scale() -> None:
    w = torch.randn(4, 16, requires_grad=True)
    wq = WeightQuantizer(QuantSpec(w_bits=4), w.shape)
    wq.init_minmax(w.detach())
    wq.scale = torch.nn.Parameter(wq.scale.clone())
    wq(w).pow(2).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert wq.scale.grad is not None and wq.scale.grad.abs().sum() > 0


def test_static_act_quantizer_passes_through_until_calibrated() -> None:
    aq = ActQuantizer(QuantSpec(a_bits=4))
    x = torch.randn(2, 8)
    assert torch.equal(aq(x), x)
    aq.set_range(x.min(), x.max())
    out = aq(x)
    assert len(torch.unique(out)) <= 16 and not torch.equal(out, x)


def test_dynamic_per_token_uses_each_rows_range() -> None:
    aq = ActQuantizer(QuantSpec(a_bits=8, a_dynamic=True, a_granularity="token"))
    x = torch.randn(1, 4, 32) * torch.tensor([0.01, 1.0, 100.0, 5.0]).view(1, 4, 1)
    rel = ((aq(x) - x).abs().amax(-1) / x.abs().amax(-1)).squeeze()
    assert (rel < 0.01).all()  # a per-tensor grid would wipe out the small rows


def test_calibration_state_survives_state_dict() -> None:
    aq = ActQuantizer(QuantSpec(a_bits=8))
    aq.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    fresh = ActQuantizer(QuantSpec(a_bits=8))
    fresh.load_state_dict(aq.state_dict())
    x = torch.randn(10)
    assert fresh.calibrated and torch.equal(fresh(x), aq(x))


def test_group_act_quantizer_ranges_are_per_token_and_group() -> None:
    aq = ActQuantizer(QuantSpec(a_bits=4, a_dynamic=True, a_granularity="group", a_group_size=4))
    assert aq.dynamic
    x = torch.randn(3, 5, 8)
    loud = x.clone()
    loud[..., :4] *= 1000.0  # one group of channels much larger
    loud[1] *= 50.0  # and one token
    q, q_loud = aq(x), aq(loud)
    assert torch.allclose(q_loud[0, :, 4:], q[0, :, 4:]) and torch.allclose(q_loud[2, :, 4:], q[2, :, 4:])
    assert torch.allclose(q_loud[..., :4], aq(loud[..., :4]))  # a group is quantized on its own range
    assert (q - x).abs().max() < (x.abs().amax() / 7) * 0.51 + 1e-6  # 4 bits: half a step per group


def test_group_activations_need_a_dynamic_quantizer_and_a_group_size() -> None:
    with pytest.raises(ValueError, match="must be dynamic"):
        QuantSpec(a_bits=4, a_granularity="group", a_group_size=4)
    with pytest.raises(ValueError, match="a_group_size"):
        QuantSpec(a_bits=4, a_dynamic=True, a_granularity="group")
