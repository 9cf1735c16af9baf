"""QuEST: only the temporal, then the attention layers are fine-tuned, with time-wise activations."""

from __future__ import annotations

import pytest
import torch

from methods.lsq import TemporalActQuantizer
from methods.quest import SENSITIVE, TEMPORAL, select
from qsearch.engine import Session
from qsearch.quant.quantizers import WeightQuantizer
from qsearch.recipe import parse_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_selection_finds_time_embedding_and_attention_layers(tiny_model_dir) -> None:
    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(tiny_model_dir("unet2d"))
    temporal, sensitive = select(_names(unet), TEMPORAL), select(_names(unet), SENSITIVE)
    assert temporal and all(n.endswith("time_emb_proj") for n in temporal)
    assert len(temporal) == sum(1 for n, m in unet.named_modules() if n.endswith("time_emb_proj"))
    assert sensitive and all(n.rsplit(".", 1)[1] in ("to_q", "to_k", "to_v") for n in sensitive)

    dit = diffusers.DiTTransformer2DModel.from_pretrained(tiny_model_dir("dit"))
    temporal = select(_names(dit), TEMPORAL)
    assert "proj_out_1" in temporal and "transformer_blocks.0.norm1.linear" in temporal


def _distill_error(ctx) -> float:
    """MSE to the FP noise prediction over the whole trajectory, one timestep per call."""
    traj = ctx.trajectory
    with torch.no_grad():
        return float(torch.stack([
            torch.nn.functional.mse_loss(
                ctx.denoiser.forward(traj.xs[k], traj.timesteps[k].expand(traj.num_samples), {}),
                ctx.fp_denoiser.forward(traj.xs[k], traj.timesteps[k].expand(traj.num_samples), {}))
            for k in range(traj.num_steps)
        ]).mean())


def test_quest_tunes_only_the_selected_layers(tiny_model_dir) -> None:
    def recipe(*stages):
        return parse_recipe({
            "model": str(tiny_model_dir("unet2d")),
            "sampler": {"scheduler": "ddim", "steps": 4},
            "quant": {"w_bits": 4, "a_bits": 4},
            "calibration_pool": {"samples": 4},
            "stages": [{"method": "uniform", "n_samples": 8}, {"method": "rtn"}, *stages],
            "eval": {"n_samples": 2, "batch_size": 2, "fid": False, "fidelity_samples": 0, "device": "cpu"},
        })

    session = Session(recipe())
    before = _distill_error(session.quantize(recipe()))
    ctx = session.quantize(recipe({"method": "quest", "temporal_steps": 8, "steps": 8, "batch_size": 4,
                                   "lr": 1e-4, "temporal_act_lr": 1e-3, "act_lr": 1e-3}))
    assert _distill_error(ctx) < before
    curves = ctx.state["loss_curves"]
    assert len(curves["quest/temporal"]) == 8 and len(curves["quest/sensitive"]) == 8
    fp = dict(session.fp.model.named_parameters())
    layers = ctx.layers()
    selected = set(select(list(layers), TEMPORAL) + select(list(layers), SENSITIVE))
    for name, layer in layers.items():
        changed = not torch.equal(layer.weight, fp[f"{name}.weight"])
        assert changed == (name in selected), name
        assert type(layer.weight_quantizer) is WeightQuantizer
        assert isinstance(layer.act_quantizer, TemporalActQuantizer)
    emb = [layers[n].act_quantizer.scale for n in select(list(layers), TEMPORAL)]
    assert all(not torch.allclose(s, s[:1].expand_as(s)) for s in emb)  # time-wise steps learned
