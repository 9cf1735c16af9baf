"""Generic module serialisation: method stages' own quantizer and transform classes round-trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qsearch.export.serialize import ExportError, LoadError, build_module, dump_module, trust
from qsearch.models import current_timestep
from qsearch.quant.quantizers import ActQuantizer
from qsearch.quant.spec import QuantSpec


class TimestepActQuantizer(ActQuantizer):
    """A TDQ-style quantizer: one scale per timestep bucket (a buffer of a new shape)."""

    def __init__(self, spec: QuantSpec, buckets: list[int]) -> None:
        super().__init__(spec)
        self.buckets = buckets
        self.register_buffer("bucket_scale", torch.rand(len(buckets)) + 0.1)
        self.calibrated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = current_timestep.get()
        index = torch.bucketize(t, torch.tensor(self.buckets[1:]))
        scale = self.bucket_scale[index].view(-1, *([1] * (x.dim() - 1)))
        return self.fake_quant(x, scale, torch.zeros_like(scale))


trust(__name__)  # this test module's classes stand in for a method package's


def _round_trip(module: nn.Module) -> nn.Module:
    stored: dict[str, torch.Tensor] = {}

    def sink(name: str, t: torch.Tensor) -> str:
        stored[name] = t.clone()
        return name

    spec = dump_module(module, "layer", sink)
    return build_module(spec, "layer", stored)


def test_subclass_with_new_state_round_trips() -> None:
    aq = TimestepActQuantizer(QuantSpec(a_bits=6), [0, 250, 500, 750])
    back = _round_trip(aq)
    assert type(back) is TimestepActQuantizer and back.buckets == [0, 250, 500, 750]
    assert back.bits == 6 and back.calibrated
    x = torch.randn(4, 8)
    token = current_timestep.set(torch.tensor([10, 300, 600, 900]))
    try:
        assert torch.equal(back(x), aq(x))
    finally:
        current_timestep.reset(token)


def test_torch_modules_round_trip() -> None:
    branch = nn.Sequential(nn.Linear(8, 2, bias=False), nn.Linear(2, 5, bias=False))
    back = _round_trip(branch)
    x = torch.randn(3, 8)
    assert torch.equal(back(x), branch(x))


def test_unserialisable_attribute_is_an_export_error() -> None:
    module = nn.Identity()
    module.fn = lambda x: x
    with pytest.raises(ExportError, match="'fn'"):
        _round_trip(module)


def test_hooks_are_an_export_error() -> None:
    module = nn.Identity()
    module.register_forward_hook(lambda *a: None)
    with pytest.raises(ExportError, match="hooks"):
        _round_trip(module)


def test_unknown_and_untrusted_classes_are_load_errors() -> None:
    """A folder naming a class that is gone, or from an arbitrary package, is refused."""
    spec = dump_module(nn.Identity(), "x", lambda n, t: n)
    with pytest.raises(LoadError, match="does not exist"):
        build_module({**spec, "class": "qsearch.quant.quantizers.RemovedQuantizer"}, "layer.pre", {})
    with pytest.raises(LoadError, match="trusted"):
        build_module({**spec, "class": "os.system"}, "layer.pre", {})
