"""``load``: an export folder back to a ready diffusers model (or pipeline), with no study database.

Loading checks the folder first (format version, size and sha256 of every file), so a truncated or
corrupted file is a ``LoadError`` rather than a model with silently wrong outputs. It then builds the
diffusers model from its config, puts back the quantized layers (spec, restored ``pre``,
``act_quantizer``, ``weight_quantizer``, ``branch`` modules, weights decoded from the packed codes),
assigns every other tensor by name (a tensor missing from the file, or one the model does not have,
is an error), and finally hands the layers to the requested backend (``qsearch.export.backends``).

With ``backend="fake"`` (``auto`` on CPU) the loaded model computes exactly what the quantized model
computed: the same seeds give the same samples, bit for bit, as the trial it came from. The loaded
model carries ``qsearch_config`` (the folder's configuration: recipe, provenance, per-layer specs),
``qsearch_backends`` (layer -> kernel or fallback) and ``qsearch_correctors`` (the recipe's error
correctors, restored); ``export_sampler`` builds the sampler the trial used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from qsearch.export import pack, tensors
from qsearch.export.backends import Backend, Dequantize, convert
from qsearch.export.fusion import fuse_qkv_projections
from qsearch.export.integrity import verify
from qsearch.export.serialize import LoadError, build_module, decode_value, import_class
from qsearch.export.writer import CONFIG_FILE, FORMAT, FORMAT_VERSION, LAYER_PARTS, WEIGHTS_FILE
from qsearch.models import LoadedModel
from qsearch.quant.modules import QuantMixin
from qsearch.quant.spec import QuantSpec
from qsearch.sampling import Sampler, SamplerConfig


def read_config(path: str | Path) -> dict[str, Any]:
    """The folder's ``qsearch_config.json``, checked for format and version."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise LoadError(f"{path}: no {CONFIG_FILE}; not a qsearch export folder")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{file}: corrupted ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise LoadError(f"{file}: not a {FORMAT} configuration")
    if config.get("format_version") != FORMAT_VERSION:
        raise LoadError(
            f"{file}: format version {config.get('format_version')}, this qsearch reads {FORMAT_VERSION}"
        )
    return config


def load(
    path: str | Path,
    *,
    backend: Backend = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    dequantize: Dequantize | None = None,
    fp8_fast_accum: bool = False,
    fuse_qkv: bool = False,
) -> Any:
    """Load an export folder; returns the diffusers model, or the pipeline if one was exported.

    ``backend``: ``auto``, ``fake``, ``int_mm``, ``scaled_mm`` or ``torchao`` (see
    ``qsearch.export.backends``). ``dtype``: the compute dtype of the model (default: as exported,
    float32). ``dequantize``: layers without a kernel keep decoded weights (``load``, the default
    of the ``fake`` backend and of CPU) or only their packed codes, decoded at every call
    (``on_the_fly``, the default with kernels on CUDA: the memory of a W4 model is its codes).
    ``fp8_fast_accum``: ``scaled_mm`` layers accumulate in the FP8 tensor cores' fast, less
    precise mode (Hopper); off by default. ``fuse_qkv``: each self-attention layer whose q/k/v
    kernel layers quantize their input identically computes them in one GEMM
    (``qsearch.export.fusion``; the outcome per attention layer is ``model.qsearch_fused``).
    """
    root = Path(path)
    config = read_config(root)
    verify(root, config["files"])
    device = torch.device(device)
    if dequantize is None:
        dequantize = "load" if backend == "fake" or device.type != "cuda" else "on_the_fly"
    model, codes, stored = build_model(root, config)
    model.qsearch_backends = convert(
        model, codes, backend=backend, device=device, dtype=dtype or torch.float32, dequantize=dequantize,
        fp8_fast_accum=fp8_fast_accum,
    )
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    model.eval().requires_grad_(False)
    if fuse_qkv:  # after the moves and casts, which would give the views their own storage again
        model.qsearch_fused = fuse_qkv_projections(model)
    model.qsearch_config = config
    model.qsearch_scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    model.qsearch_correctors = _build_correctors(config, stored)
    if config["pipeline"] is None:
        return model
    import diffusers

    attr = config["denoiser"]["subfolder"]
    extra = {"torch_dtype": dtype} if dtype is not None else {}
    pipeline = diffusers.DiffusionPipeline.from_pretrained(root, **{attr: model}, **extra)
    return pipeline.to(device)


def build_model(root: Path, config: dict[str, Any]) -> tuple[nn.Module, dict[str, tuple], dict[str, torch.Tensor]]:
    """The fake-quantized model in float32 on CPU, each layer's ``(codes, packed, bits)``, and the
    decoded tensors of the weights file."""
    import diffusers

    sub = root / config["denoiser"]["subfolder"]
    cls = getattr(diffusers, config["denoiser"]["class"], None)
    if cls is None:
        raise LoadError(f"{root}: diffusers has no model class {config['denoiser']['class']!r}")
    model = cls.from_config(cls.load_config(sub))
    stored, packed = _stored_tensors(root, config)
    codes: dict[str, tuple] = {}
    for name, entry in config["layers"].items():
        codes.update(_restore_layer(model, name, entry, stored, packed))
    _assign_tensors(model, config, stored)
    return model.eval().requires_grad_(False), codes, stored


def _stored_tensors(root: Path, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decoded tensors and (still packed) weight codes of the weights file, by key."""
    file = root / config["denoiser"]["subfolder"] / WEIGHTS_FILE
    try:
        raw = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise LoadError(f"{file}: cannot be read ({exc})") from None
    metas = config["tensors"]
    if set(raw) != set(metas):
        missing, extra = sorted(set(metas) - set(raw)), sorted(set(raw) - set(metas))
        raise LoadError(f"{file}: tensors do not match the configuration (missing {missing[:5]}, extra {extra[:5]})")
    stored, packed = {}, {}
    for key, t in raw.items():
        if metas[key]["as"] == "packed":
            packed[key] = t
        else:
            # A copy in freshly allocated (aligned) memory: safetensors' tensors are views at any
            # byte offset of the file buffer, and CPU GEMM kernels round differently on unaligned
            # operands, which would break bit-exact reproduction of the trial.
            stored[key] = tensors.decode(t, metas[key]).clone()
    return stored, packed


def _restore_layer(model: nn.Module, name: str, entry: dict, stored: dict, packed: dict) -> dict[str, tuple]:
    """Put the quantized layer ``name`` back into ``model``; returns its codes if it has packed ones."""
    try:
        plain = model.get_submodule(name)
    except AttributeError:
        raise LoadError(f"layer {name!r} of the export does not exist in the model") from None
    if not isinstance(plain, (nn.Linear, nn.Conv2d)):
        raise LoadError(f"layer {name!r} is a {type(plain).__name__} in the model, not Linear/Conv2d")
    cls = import_class(entry["class"], name)
    if not issubclass(cls, QuantMixin):
        raise LoadError(f"{name}: {entry['class']} is not a quantized layer class")
    layer = cls.from_float(plain, QuantSpec.model_validate(entry["spec"]))
    for part in LAYER_PARTS:
        spec = entry[part]
        setattr(layer, part, build_module(spec, f"{name}.{part}", stored) if spec is not None else None)
    layer.quant_enabled = entry["quant_enabled"]
    model.set_submodule(name, layer)
    weight = entry["weight"]
    if weight is None:
        return {}
    bits, packed_codes = weight["bits"], packed[weight["codes"]]
    try:
        codes = pack.unpack(packed_codes, bits, layer.weight.numel()).view(layer.weight.shape)
    except ValueError as exc:
        raise LoadError(f"{name}: packed weight codes do not fit the layer ({exc})") from None
    with torch.no_grad():
        decoded = layer.weight_quantizer.decode(codes.to(tensors.dtype_from_name(weight["dtype"])))
    layer.weight = nn.Parameter(decoded, requires_grad=False)
    return {name: (codes, packed_codes, bits)}


def _assign_tensors(model: nn.Module, config: dict[str, Any], stored: dict[str, torch.Tensor]) -> None:
    """Assign every non-layer tensor by name; the model must end up with no tensor left unloaded."""
    layers = config["layers"]
    covered = tuple(f"{name}.{part}." for name in layers for part in LAYER_PARTS) + ("correctors.",)
    packed = {f"{name}.weight" for name, entry in layers.items() if entry["weight"] is not None}
    loaded: set[str] = set()
    for key, t in stored.items():
        if key.startswith(covered):
            continue
        _set_tensor(model, key, t)
        loaded.add(key)
    for alias, target in config["aliases"].items():
        module_name, _, attr = alias.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        setattr(module, attr, _get_tensor(model, target))
        loaded.add(alias)
    names = [n for n, _ in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))]
    missing = [n for n in names if n not in loaded and n not in packed and not n.startswith(covered)]
    if missing:
        raise LoadError(f"tensors missing from the weights file: {', '.join(missing[:5])}")


def _get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    module_name, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, attr)


def _set_tensor(model: nn.Module, key: str, t: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise LoadError(f"tensor {key!r} of the weights file has no place in the model") from None
    if attr in module._parameters:
        old = module._parameters[attr]
        new: torch.Tensor = nn.Parameter(t, requires_grad=False)
    elif attr in module._buffers:
        old, new = module._buffers[attr], t
    else:
        raise LoadError(f"tensor {key!r} of the weights file has no place in the model")
    if old is not None and old.shape != t.shape:
        raise LoadError(f"tensor {key!r}: shape {tuple(t.shape)} in the file, {tuple(old.shape)} in the model")
    (module._parameters if attr in module._parameters else module._buffers)[attr] = new


def _build_correctors(config: dict[str, Any], stored: dict[str, torch.Tensor]) -> list[Any]:
    """The recipe's error correctors with the statistics they had measured."""
    from qsearch.registry import REGISTRY

    correctors = []
    for i, entry in enumerate(config["correctors"]):
        cls = REGISTRY.get(entry["method"])
        corrector = cls(cls.Config.model_validate(entry["config"]))
        for k, v in entry["state"].items():
            setattr(corrector, k, decode_value(v, f"correctors.{i}", stored))
        correctors.append(corrector)
    return correctors


def export_sampler(model: nn.Module, scheduler: str | None = None) -> Sampler:
    """The sampler of the trial a loaded model came from (its scheduler, steps, guidance)."""
    config = model.qsearch_config
    recipe_sampler = dict(config["recipe"].get("sampler") or {})
    if scheduler is not None:
        recipe_sampler["scheduler"] = scheduler
    loaded = LoadedModel(model, dict(model.qsearch_scheduler_config), source="export")
    return Sampler(loaded, SamplerConfig(**recipe_sampler))
