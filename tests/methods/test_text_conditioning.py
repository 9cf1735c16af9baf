"""The DiT methods on text-conditional models (U-Net, PixArt): cross-attention is quantized and still
reads the text."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_recipe
from qsearch.engine import Session
from qsearch.recipe import parse_recipe

TOKEN_DYNAMIC = {"w_bits": 4, "a_bits": 8, "a_dynamic": True, "a_granularity": "token"}
METHODS = {
    "ptq4dit": ([{"method": "ptq4dit"}, {"method": "rtn"}], {"w_bits": 8, "a_bits": 8}),
    "ditas": ([{"method": "ditas", "grid": 5, "max_rows": 256}, {"method": "rtn"}],
              {"w_bits": 8, "a_bits": 8}),
    "vidit_q": ([{"method": "vidit_q"}, {"method": "rtn"}], TOKEN_DYNAMIC),
    "q_dit": ([{"method": "q_dit", "group_sizes": [8, 16, 32], "min_mean_group_size": 16, "population": 2,
                "select": 1, "mutations": 1, "crossovers": 0, "epochs": 1, "n_samples": 1}], TOKEN_DYNAMIC),
}


@pytest.mark.parametrize("kind", ["unet2d_condition", "pixart"])
@pytest.mark.parametrize("method", list(METHODS))
def test_cross_attention_quantized_and_prompts_still_differ(tiny_model_dir, kind, method) -> None:
    stages, quant = METHODS[method]
    r = parse_recipe(tiny_recipe(tiny_model_dir(kind), quant=quant,
                                 stages=[{"method": "uniform", "n_samples": 8}, *stages]))
    session = Session(r)
    ctx = session.quantize(r)
    cross = {n: l for n, l in ctx.layers().items() if ".attn2.to_" in n}
    assert len(cross) >= 8 and len(cross) % 4 == 0  # per cross-attention: to_q, to_k, to_v, to_out.0
    for layer in cross.values():
        assert layer.quant_enabled and layer.weight_quantizer is not None
        assert layer.act_quantizer.dynamic or layer.act_quantizer.calibrated

    model = session.fp.model
    prompts = session.sampler.encode_prompts(model, ["a red car", "a bowl of soup"])
    size = model.config.sample_size
    noise = torch.randn(1, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    x = noise.repeat(2, 1, 1, 1)
    t = torch.full((2,), 500)
    with torch.no_grad():
        fp = session.fp.forward(x, t, {"encoder_hidden_states": prompts})
        q = ctx.denoiser.forward(x, t, {"encoder_hidden_states": prompts})
    fp_diff, q_diff = (fp[0] - fp[1]).flatten(), (q[0] - q[1]).flatten()
    assert q_diff.norm() > 0.5 * fp_diff.norm()  # the prompt still changes the output ...
    assert F.cosine_similarity(q_diff, fp_diff, dim=0) > 0.8  # ... the way it changes the FP output
