"""One GEMM for the q, k and v projections of a self-attention layer (``load(..., fuse_qkv=True)``).

The three projections read the same input. Unfused, a W8A8 model quantizes that input three times
(three passes writing 8-bit copies) and runs three GEMMs of ``N = d``; fused, it quantizes it once
and runs one GEMM of ``N = 3d``, which the tensor cores fill better. On DiT-XL/2 at batch 256 the
quantization passes are what keeps the FP8 model from its GEMMs' speed-up (BENCHMARKS.md, issue 8).

Fusing is exact only when the three layers quantize their input identically: the same kernel
class and static activation grid, no smoothing ``pre`` or low-rank branch (they act on the input
per layer). Per-channel weight scales concatenate with their rows. Layers that do not qualify stay
as they are. The fused layer's buffers are the storage; ``to_q``/``to_k``/``to_v`` keep views into
it (what diffusers' own ``fuse_projections`` copies), so fusing costs no memory. Dense models
(the BF16 references of a benchmark) are fused the same way, with diffusers' fused processor.
"""

from __future__ import annotations

import torch
from torch import nn

from qsearch.export.layers import Fp8MMLinear, Int8MMLinear, share_state

# the kernel layers' per-output-row buffers, concatenated when fusing (the others must be equal)
ROW_BUFFERS: dict[type, tuple[str, ...]] = {
    Fp8MMLinear: ("w_fp8_bits", "w_scale_bits"),
    Int8MMLinear: ("w_int8", "w_colsum", "w_scale_bits"),
}


def unfusable(layers: list[nn.Module]) -> str | None:
    """Why the q/k/v layers cannot become one GEMM exactly (None: they can)."""
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1:
        return "different layer classes"
    if len({layer.out_features for layer in layers}) != 1:  # the fused processor splits in thirds
        return "q, k and v widths differ"
    kind = kinds.pop()
    if kind is nn.Linear:
        return None if len({layer.bias is None for layer in layers}) == 1 else "bias on some layers only"
    if kind not in ROW_BUFFERS:
        return f"{kind.__name__} has no fused form"
    first = layers[0]
    for layer in layers:
        if layer.pre is not None or layer.branch is not None:
            return "a per-layer input transform or low-rank branch"
        if not layer.act_static:
            return "dynamic activation ranges"
        if (layer.bias is None) != (first.bias is None) or getattr(layer, "fast_accum", False) != getattr(first, "fast_accum", False):
            return "bias or accumulation mode differs"
        if not (torch.equal(layer.act_scale_bits, first.act_scale_bits)
                and torch.equal(layer.act_zero_bits, first.act_zero_bits)):
            return "different activation grids"
    return None


def _fuse_rows(layers: list[nn.Module], names: tuple[str, ...], fused: nn.Module) -> None:
    """Concatenate each named tensor over the layers into ``fused``; the layers keep views into it."""
    for name in names:
        parts = [getattr(layer, name) for layer in layers]
        whole = torch.cat([p.detach() for p in parts])
        if isinstance(parts[0], nn.Parameter):
            setattr(fused, name, nn.Parameter(whole, requires_grad=False))
        else:
            fused.register_buffer(name, whole)
        start = 0
        for layer, part in zip(layers, parts):
            view = getattr(fused, name)[start:start + part.shape[0]]
            setattr(layer, name, nn.Parameter(view, requires_grad=False) if isinstance(part, nn.Parameter) else view)
            start += part.shape[0]


def fused_projection(layers: list[nn.Module]) -> nn.Module:
    """One layer computing ``cat([q(x), k(x), v(x)], -1)``, from layers that ``unfusable`` accepts."""
    first = layers[0]
    out_features = sum(layer.out_features for layer in layers)
    bias = ("bias",) if first.bias is not None else ()
    if type(first) is nn.Linear:
        w = first.weight
        fused = nn.Linear(first.in_features, out_features, bias=bool(bias), device=w.device, dtype=w.dtype)
        _fuse_rows(layers, ("weight", *bias), fused)
        return fused.requires_grad_(False)
    fused = share_state(type(first), first)
    fused.out_features = out_features
    _fuse_rows(layers, (*ROW_BUFFERS[type(first)], *bias), fused)
    return fused


def fuse_qkv_projections(model: nn.Module) -> dict[str, str]:
    """Fuse the q/k/v projections of every self-attention layer that allows it, in place.

    Returns ``{attention layer: "fused" or why not}``. Only layers on diffusers' default processor
    (``AttnProcessor2_0``) are touched: its fused counterpart computes the same attention.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    outcome: dict[str, str] = {}
    for name, attn in model.named_modules():
        if not isinstance(attn, Attention) or attn.is_cross_attention:
            continue
        layers = [attn.to_q, attn.to_k, attn.to_v]
        reason = None if type(attn.processor) is AttnProcessor2_0 else f"processor {type(attn.processor).__name__}"
        reason = reason or unfusable(layers)
        if reason is None:
            attn.to_qkv = fused_projection(layers)
            attn.fused_projections = True
            attn.set_processor(FusedAttnProcessor2_0())
        outcome[name] = reason or "fused"
    return outcome
