"""Q-DiT: per-token group-wise dynamic activations, group-wise weights, evolution within the budget."""

from __future__ import annotations

import random


from tests.conftest import tiny_recipe
from methods.q_dit import EvolutionSearch
from qsearch.engine import Session
from qsearch.recipe import parse_recipe

QDIT = {"method": "q_dit", "group_sizes": [8, 16, 32], "min_mean_group_size": 16, "population": 4,
        "select": 2, "mutations": 2, "crossovers": 1, "epochs": 1, "n_samples": 2}


def test_evolution_stays_within_budget_and_returns_the_best() -> None:
    target = (32, 8, 32, 8, 16, 16)
    search = EvolutionSearch(6, [8, 16, 32], 16.0, lambda c: sum(abs(a - b) for a, b in zip(c, target)),
                             random.Random(0))
    best = search.run((16,) * 6, population=6, select=3, mutations=4, crossovers=2, prob=0.3, epochs=4)
    assert (16,) * 6 in search.history
    assert all(sum(c) / len(c) >= 16 for c in search.history)
    assert search.history[best] == min(search.history.values()) < search.history[(16,) * 6]


def test_stage_sets_searched_group_sizes_and_dynamic_activations(tiny_model_dir) -> None:
    r = parse_recipe(tiny_recipe(tiny_model_dir("dit"), stages=[{"method": "uniform", "n_samples": 8}, QDIT]))
    ctx = Session(r).quantize(r)
    state = ctx.state["q_dit"]
    sizes = state["group_sizes"]
    assert len(sizes) == 2 * 6  # per block: to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2
    assert set(sizes.values()) <= {8, 16, 32}
    for block in range(2):
        qkv = {sizes[f"transformer_blocks.{block}.attn1.{p}"] for p in ("to_q", "to_k", "to_v")}
        assert len(qkv) == 1  # one shared input, one group size
    genes = [s for n, s in sizes.items() if not n.endswith(("to_k", "to_v"))]
    assert sum(genes) / len(genes) >= 16
    assert state["fitness"] == min(state["history"].values())
    layers = ctx.layers()
    for name, size in sizes.items():
        layer = layers[name]
        wq, aq = layer.weight_quantizer, layer.act_quantizer
        assert wq.granularity == "group" and wq.group_size == size
        assert wq.scale.shape == (layer.weight.shape[0], -(-layer.weight.shape[1] // size), 1)
        assert aq.granularity == "group" and aq.dynamic and aq.group_size == size
        assert ctx.specs[name].group_size == size and ctx.specs[name].a_dynamic
    assert layers["proj_out_2"].act_quantizer.calibrated  # other layers: rtn grids
