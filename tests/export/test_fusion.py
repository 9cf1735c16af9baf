"""q/k/v fusion: one GEMM computes what the three did, without extra memory; unfit layers are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, FusedAttnProcessor2_0

from qsearch.export import export_model, load
from qsearch.export.fusion import fuse_qkv_projections
from tests.export.export_testing import eps, quantize, recipe

FP8 = {"w_bits": 8, "w_format": "fp", "a_bits": 8, "a_format": "fp"}
INT8 = {"w_bits": 8, "a_bits": 8}


def _export(model_dir, quant, tmp_path, **extra):
    data = recipe(model_dir, quant, **extra)
    _, ctx = quantize(data)
    return ctx, export_model(ctx, tmp_path / "export", recipe=data)


@pytest.mark.parametrize(("kind", "quant", "backend"), [("dit", FP8, "scaled_mm"), ("dit", INT8, "int_mm"),
                                                        ("pixart", FP8, "scaled_mm"), ("unet2d", INT8, "int_mm")])
def test_fused_projections_compute_the_three_layers(tiny_model_dir, tmp_path, kind, quant, backend) -> None:
    _, out = _export(tiny_model_dir(kind), quant, tmp_path)
    plain = load(out, backend=backend)
    fused = load(out, backend=backend, fuse_qkv=True)
    self_attention = [n for n in fused.qsearch_fused]
    assert self_attention and set(fused.qsearch_fused.values()) == {"fused"}
    if kind == "pixart":
        assert all(n.endswith("attn1") for n in self_attention)  # its cross-attention stays unfused
    torch.testing.assert_close(eps(fused), eps(plain), rtol=1e-5, atol=1e-5)
    attn = fused.get_submodule(self_attention[0])
    assert isinstance(attn.processor, FusedAttnProcessor2_0)
    weights = "w_fp8_bits" if backend == "scaled_mm" else "w_int8"
    whole = getattr(attn.to_qkv, weights)
    assert whole.shape[0] == 3 * getattr(attn.to_q, weights).shape[0]
    for layer in (attn.to_q, attn.to_k, attn.to_v):  # views into the fused storage: no second copy
        assert getattr(layer, weights).untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


def test_dense_model_is_fused_with_shared_weights(tiny_model_dir, tmp_path) -> None:
    ctx, _ = _export(tiny_model_dir("dit"), FP8, tmp_path)
    dense = copy.deepcopy(ctx.fp_denoiser.model)
    before = eps(dense)
    outcome = fuse_qkv_projections(dense)
    assert set(outcome.values()) == {"fused"}
    torch.testing.assert_close(eps(dense), before, rtol=1e-5, atol=1e-6)
    attn = dense.get_submodule(next(iter(outcome)))
    assert attn.to_k.weight.untyped_storage().data_ptr() == attn.to_qkv.weight.untyped_storage().data_ptr()


def test_layers_with_different_input_grids_are_left_alone(tiny_model_dir, tmp_path) -> None:
    """A to_k at 8-bit int next to FP8 q/v (or any other grid) cannot share the quantized input."""
    _, out = _export(tiny_model_dir("dit"), FP8, tmp_path)
    model = load(out, backend="scaled_mm")
    name, attn = next((n, m) for n, m in model.named_modules() if n.endswith("attn1"))
    attn.to_k.act_scale_bits = attn.to_k.act_scale_bits.view(torch.float32).mul(2).view(torch.int32)
    outcome = fuse_qkv_projections(model)
    assert outcome[name] == "different activation grids"
    assert not hasattr(attn, "to_qkv") and not isinstance(attn.processor, FusedAttnProcessor2_0)


def test_other_attention_processors_are_not_replaced(tiny_model_dir, tmp_path) -> None:
    _, out = _export(tiny_model_dir("dit"), FP8, tmp_path)
    model = load(out, backend="scaled_mm")
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    assert set(fuse_qkv_projections(model).values()) == {"processor AttnProcessor"}


def test_unequal_projection_widths_are_left_alone(tiny_model_dir, tmp_path) -> None:
    """Grouped-query attention (k, v narrower than q): the fused processor would split at the wrong place."""
    _, out = _export(tiny_model_dir("dit"), FP8, tmp_path)
    model = load(out, backend="scaled_mm")
    attn = next(m for n, m in model.named_modules() if n.endswith("attn1"))
    attn.to_k.out_features //= 2
    assert "q, k and v widths differ" in fuse_qkv_projections(model).values()
