"""Export then load: the same model, bit for bit, from the folder alone; damaged folders refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.export.export_testing import SAMPLES, eps, quantize, recipe
from qsearch.export import IntegrityError, LoadError, export_model, export_sampler, load
from qsearch.models import Denoiser

FORMATS = {
    "w8a8": {"w_bits": 8, "a_bits": 8},
    "w4_channel": {"w_bits": 4, "a_bits": None},
    "w3_group_asym": {"w_bits": 3, "w_granularity": "group", "group_size": 16, "w_symmetric": False,
                      "a_bits": 8},
    "fp4": {"w_bits": 4, "w_format": "fp", "a_bits": 8},
}


def _round_trip(model_dir: Path, quant: dict, tmp_path: Path, **load_kwargs):
    data = recipe(model_dir, quant)
    session, ctx = quantize(data)
    samples = session.sampler.sample(ctx.denoiser, SAMPLES, seed=0, batch_size=SAMPLES)
    out = export_model(ctx, tmp_path / "export", recipe=data, provenance={"study": "s", "trial": 3})
    loaded = load(out, backend="fake", **load_kwargs)
    return ctx, samples, loaded, out


@pytest.mark.parametrize("fmt", FORMATS)
def test_loaded_model_reproduces_the_trial_bit_exactly(tiny_model_dir, tmp_path, fmt) -> None:
    kind = "unet2d" if fmt == "w3_group_asym" else "dit"  # convolutions: grouped over (in, kh, kw)
    ctx, samples, loaded, _ = _round_trip(tiny_model_dir(kind), FORMATS[fmt], tmp_path)
    assert torch.equal(eps(loaded), eps(ctx.model))
    again = export_sampler(loaded).sample(Denoiser(loaded), SAMPLES, seed=0, batch_size=SAMPLES)
    assert torch.equal(again, samples)


def test_dequantize_on_the_fly_keeps_only_codes_and_is_exact(tiny_model_dir, tmp_path) -> None:
    ctx, _, loaded, _ = _round_trip(tiny_model_dir("dit"), FORMATS["w4_channel"], tmp_path,
                                    dequantize="on_the_fly")
    assert set(loaded.qsearch_backends.values()) == {"dequant_on_the_fly"}
    names = {n for n, _ in loaded.named_parameters()}
    for name in loaded.qsearch_backends:
        assert f"{name}.weight" not in names
        assert loaded.get_submodule(name).weight_codes.dtype == torch.uint8
    assert torch.equal(eps(loaded), eps(ctx.model))


def test_provenance_and_layer_specs_are_recorded(tiny_model_dir, tmp_path) -> None:
    ctx, _, loaded, out = _round_trip(tiny_model_dir("dit"), FORMATS["w8a8"], tmp_path)
    config = json.loads((out / "qsearch_config.json").read_text())
    assert config["provenance"] == {"study": "s", "trial": 3}
    assert config["recipe"]["quant"] == FORMATS["w8a8"]
    assert {n: e["spec"]["w_bits"] for n, e in config["layers"].items()} == {
        n: layer.spec.w_bits for n, layer in ctx.layers().items()
    }
    assert config["bits"]["avg_weight_bits"] == pytest.approx(8.0)
    assert loaded.qsearch_config["provenance"]["trial"] == 3


def test_loading_needs_no_study_database(tiny_model_dir, tmp_path, monkeypatch) -> None:
    _, _, _, out = _round_trip(tiny_model_dir("dit"), FORMATS["w8a8"], tmp_path)
    for module in ("qsearch.storage", "qsearch.search", "optuna", "sqlalchemy"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of them now fails
    assert load(out, backend="fake").qsearch_config["layers"]


def _weights(out: Path) -> Path:
    return next(out.glob("*/model.safetensors"))


def test_flipped_byte_is_a_checksum_error(tiny_model_dir, tmp_path) -> None:
    _, _, _, out = _round_trip(tiny_model_dir("dit"), FORMATS["w4_channel"], tmp_path)
    data = bytearray(_weights(out).read_bytes())
    data[-100] ^= 0x10  # inside the packed codes, not the header: it would load without a checksum
    _weights(out).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        load(out)


def test_truncated_file_is_an_error(tiny_model_dir, tmp_path) -> None:
    _, _, _, out = _round_trip(tiny_model_dir("dit"), FORMATS["w4_channel"], tmp_path)
    data = _weights(out).read_bytes()
    _weights(out).write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="truncated"):
        load(out)


def test_damaged_configuration_is_an_error(tiny_model_dir, tmp_path) -> None:
    _, _, _, out = _round_trip(tiny_model_dir("dit"), FORMATS["w4_channel"], tmp_path)
    config = out / "qsearch_config.json"
    config.write_text(config.read_text()[:-20])
    with pytest.raises(LoadError, match="corrupted"):
        load(out)
    (out / "qsearch_config.json").unlink()
    with pytest.raises(LoadError, match="not a qsearch export"):
        load(out)


def test_unknown_layer_class_is_a_clear_error(tiny_model_dir, tmp_path) -> None:
    _, _, _, out = _round_trip(tiny_model_dir("dit"), FORMATS["w8a8"], tmp_path)
    path = out / "qsearch_config.json"
    config = json.loads(path.read_text())
    name = next(iter(config["layers"]))
    config["layers"][name]["act_quantizer"]["class"] = "methods.gone.TimestepQuantizer"
    path.write_text(json.dumps(config))
    with pytest.raises(LoadError, match=f"{name}.act_quantizer: class methods.gone.TimestepQuantizer does not exist"):
        load(out)
