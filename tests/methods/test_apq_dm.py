"""APQ-DM: a searched partition of the timesteps, one activation grid per group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import tiny_recipe
from methods.apq_dm import GroupSearchActQuantizer, contiguous_groups
from methods.brecq import ActTraining, Unit, UnitData, reconstruct_activations, timestep_context
from qsearch.engine import Session
from qsearch.quant import QuantLinear, QuantSpec
from qsearch.recipe import parse_recipe

A4 = QuantSpec(w_bits=None, a_bits=4)
TIMESTEPS = torch.tensor([999.0, 799.0, 599.0, 399.0, 199.0, 0.0])


def quantize_at(q: GroupSearchActQuantizer, x: torch.Tensor, t: float) -> torch.Tensor:
    with timestep_context(torch.full((x.shape[0],), t)):
        return q(x)


def test_search_mixes_the_groups_and_ends_with_one_grid_per_group() -> None:
    q = GroupSearchActQuantizer(A4, TIMESTEPS, torch.tensor([0.2, 0.05]), torch.tensor([8.0, 8.0]))
    x = torch.randn(3, 16)
    group = [q.fake_quant(x, q.scale[g], q.zero_point[g]) for g in range(2)]
    assert torch.allclose(quantize_at(q, x, 999.0), (group[0] + group[1]) / 2, atol=1e-6)  # uniform start
    with torch.no_grad():
        q.alpha.copy_(torch.tensor([[4.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 5.0], [1.0, 0.0], [0.0, 0.0]]))
    q.seen.zero_()
    for t in (999.0, 799.0, 599.0, 399.0):  # 199 and 0 never seen: they join the nearest seen step
        quantize_at(q, x, t)
    q.assign()
    assert q.alpha is None and not list(q.reconstruction_parameters())
    assert q.group_of.tolist() == [0, 0, 1, 1, 1, 1]
    assert q.scale.shape == (2,)  # one grid per group
    same = [quantize_at(q, x, t) for t in (599.0, 399.0, 0.0)]
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
    assert torch.equal(quantize_at(q, x, 999.0), group[0])
    assert not torch.equal(quantize_at(q, x, 999.0), same[0])


def test_search_moves_a_timestep_to_the_group_that_fits_its_range() -> None:
    """Steps 0-1 have wide inputs, 2-5 narrow; the contiguous start puts step 2 with the wide ones."""
    torch.manual_seed(0)
    fp = nn.Linear(8, 8)
    t = TIMESTEPS.repeat_interleave(64)
    wide = (t >= 799).float().unsqueeze(1)
    x = torch.randn(len(t), 8) * (0.1 + 2.9 * wide)
    start = contiguous_groups(len(TIMESTEPS), 2)
    assert start.tolist() == [0, 0, 0, 1, 1, 1]
    layer = QuantLinear.from_float(fp, A4)
    layer.weight.requires_grad_(False)
    scales, zeros = [], []
    for g in range(2):
        rows = x[start[torch.searchsorted(-TIMESTEPS, -t)] == g]
        scale, zero = layer.act_quantizer.qparams(rows.amin(), rows.amax())
        scales.append(scale)
        zeros.append(zero)
    q = GroupSearchActQuantizer(A4, TIMESTEPS, torch.stack(scales), torch.stack(zeros))
    layer.act_quantizer = q
    data = UnitData.from_calls([((x,), {}, t)], [fp(x).detach()])
    record = reconstruct_activations(
        Unit("fc", layer, {"fc": layer}), data, ActTraining(200, 4e-4, 2.4, 64),
        regularizer=lambda: 0.01 * q.entropy(), lr_of={id(q.alpha): 1e-2},
    )
    assert record["after"] < record["before"]
    q.assign()
    assert q.group_of.tolist() == [0, 0, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def apq_result(tiny_model_dir):
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant={"w_bits": 8, "a_bits": 4},
        stages=[{"method": "uniform", "n_samples": 16},
                {"method": "apq_dm", "groups": 2, "iters": 10, "batch_size": 8}],
    ))
    session = Session(recipe)
    return session, recipe, session.quantize(recipe)


def test_apq_dm_stage_gives_every_layer_one_grid_per_timestep_group(apq_result) -> None:
    session, recipe, ctx = apq_result
    steps = ctx.sampler.timesteps
    layers = {n: m for n, m in ctx.layers().items() if m.act_quantizer is not None}
    for name, layer in layers.items():
        q = layer.act_quantizer
        assert isinstance(q, GroupSearchActQuantizer) and q.alpha is None
        assert q.scale.shape == (2,) and set(q.group_of.tolist()) <= {0, 1}
    assert ctx.state["reconstruction"]["apq_dm"]["groups"].keys() == layers.keys()
    # inputs at two timesteps of the same group are quantized alike (4 steps, 2 groups: a pair exists)
    name, layer = next(iter(layers.items()))
    q = layer.act_quantizer
    groups = q.group_of.tolist()
    a, b = next((i, j) for i in range(len(steps)) for j in range(i + 1, len(steps)) if groups[i] == groups[j])
    conv = isinstance(layer, nn.Conv2d)
    x = torch.randn(2, layer.in_channels, 4, 4) if conv else torch.randn(2, 7, layer.in_features)
    assert torch.equal(quantize_at(q, x, float(steps[a])), quantize_at(q, x, float(steps[b])))
    metrics = session.evaluate(ctx, recipe)
    assert metrics["psnr"] > 10

