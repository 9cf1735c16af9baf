"""``export_model``: write a quantized model as a self-contained folder of packed low-bit weights.

Layout (diffusers-style, so the denoiser folder sits where a pipeline expects it)::

    OUT/
      qsearch_config.json          recipe, provenance, per-layer specs and bits, tensor encodings,
                                   format version, size and sha256 of every other file
      <unet|transformer>/
        config.json                the diffusers model config (``model.save_config``)
        model.safetensors          packed weight codes, fp16 scales, zero points, everything else
      scheduler/scheduler_config.json   the scheduler the trial sampled with (e.g. DDIM)
      model_index.json, <other components>/   only when the source model was a pipeline

Per quantized layer ``L`` the weights file holds ``L.weight.codes`` (the weight quantizer's codes,
bit-packed at the layer's width by ``qsearch.export.pack``) and, under ``L.weight_quantizer.*``,
``L.act_quantizer.*``, ``L.pre.*``, ``L.branch.*``, the state of the modules the method stages left
on the layer (serialised generically by ``qsearch.export.serialize``). Every other tensor (FP
layers, biases, norms, embeddings) is stored under its ``state_dict`` name, losslessly compacted
(``qsearch.export.tensors``). Before anything is written, each layer's codes are decoded and
compared with the weight the quantized layer computes with: a quantizer whose ``encode``/``decode``
do not reproduce its ``forward`` is an error, so a folder never loads into a different model.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import save_file
from torch import nn

from qsearch import __version__
from qsearch.export import pack, tensors
from qsearch.export.integrity import file_records
from qsearch.export.serialize import ExportError, class_path, dump_module, encode_value
from qsearch.models import DENOISER_ATTRS, Denoiser
from qsearch.quant.bits import bits_report
from qsearch.quant.modules import QuantMixin, quant_layers
from qsearch.stages import QuantContext

logger = logging.getLogger(__name__)

FORMAT = "qsearch-export"
FORMAT_VERSION = 2  # 2: Hadamard rotations keep their block size, not the matrix
CONFIG_FILE = "qsearch_config.json"
WEIGHTS_FILE = "model.safetensors"
LAYER_PARTS = ("weight_quantizer", "act_quantizer", "pre", "branch")

# Largest difference (relative to the weight's magnitude) between the decoded codes and the weight
# the layer computes with that is still a rounding artefact of a straight-through estimator (a few
# ulps), exported with a warning; anything larger means the quantizer's codes are not its forward.
ULP_TOLERANCE = 1e-6


class _TensorStore:
    """Collects the tensors of the weights file and how each one is encoded."""

    def __init__(self, lossy_fp16: bool) -> None:
        self.lossy_fp16 = lossy_fp16
        self.stored: dict[str, torch.Tensor] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def add(self, key: str, t: torch.Tensor, *, lossy: bool = False) -> str:
        if key in self.stored:
            raise ExportError(f"two tensors would be stored under {key!r}")
        stored, meta = tensors.encode(t, lossy_fp16=lossy and self.lossy_fp16)
        self.stored[key] = stored.clone()  # safetensors refuses tensors that share memory
        self.meta[key] = meta
        return key

    def add_packed(self, key: str, codes: torch.Tensor, bits: int) -> str:
        self.stored[key] = pack.pack(codes, bits).cpu()
        self.meta[key] = {"as": "packed", "bits": bits, "count": codes.numel(),
                          "shape": list(codes.shape), "dtype": "uint8"}
        return key

    def sink(self, prefix: str):
        return lambda name, t: self.add(f"{prefix}.{name}", t)


def export_model(
    source: QuantContext | Denoiser | nn.Module,
    out_dir: str | Path,
    *,
    recipe: dict[str, Any] | BaseModel,
    provenance: dict[str, Any] | None = None,
    scheduler_config: dict[str, Any] | None = None,
    lossy_fp16: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``source``'s quantized denoiser to ``out_dir``; returns the folder.

    ``source`` is a finished ``QuantContext`` (its scheduler, pipeline and error correctors come
    with it) or a bare quantized model, which then needs ``scheduler_config``. ``provenance`` is
    free JSON (study, trial, measured FID and bits). ``lossy_fp16`` stores the full-precision parts
    in fp16 even where that rounds them (smaller, no longer bit-exact).
    """
    model, scheduler, pipeline, correctors = _unpack_source(source, scheduler_config)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    recipe_data = recipe.model_dump(mode="json") if isinstance(recipe, BaseModel) else dict(recipe)
    attr = _denoiser_attr(model, pipeline)

    store = _TensorStore(lossy_fp16)
    layers = {name: _dump_layer(name, layer, store) for name, layer in quant_layers(model).items()}
    aliases = _dump_other_tensors(model, layers, store)
    corrector_state = [_dump_corrector(i, c, store) for i, c in enumerate(correctors)]

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if pipeline is not None:
            _save_pipeline_components(pipeline, attr, type(model).__name__, type(scheduler).__name__, staging)
        _save_scheduler(scheduler, staging / "scheduler")
        (staging / attr).mkdir()
        save_file(store.stored, str(staging / attr / WEIGHTS_FILE),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        model.save_config(staging / attr)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "qsearch_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "denoiser": {"class": type(model).__name__, "subfolder": attr},
            "pipeline": type(pipeline).__name__ if pipeline is not None else None,
            "recipe": recipe_data,
            "provenance": provenance or {},
            "bits": bits_report(model).as_dict(),
            "layers": layers,
            "aliases": aliases,
            "correctors": corrector_state,
            "tensors": store.meta,
            "files": file_records(staging),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=_json_default))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _unpack_source(source, scheduler_config):
    """Model, scheduler (object or config dict), pipeline and correctors of what is exported."""
    if isinstance(source, QuantContext):
        loaded = source.sampler.loaded
        return source.model, source.sampler.scheduler, loaded.pipeline, list(source.correctors)
    model = source.model if isinstance(source, Denoiser) else source
    if scheduler_config is None:
        raise ExportError("exporting a bare model needs scheduler_config (or export a QuantContext)")
    return model, dict(scheduler_config), None, []


def _denoiser_attr(model: nn.Module, pipeline: Any) -> str:
    """The pipeline attribute (and subfolder) of the denoiser: ``unet`` or ``transformer``."""
    if pipeline is not None:
        for attr in DENOISER_ATTRS:
            if getattr(pipeline, attr, None) is not None:
                return attr
    return "unet" if "UNet" in type(model).__name__ else "transformer"


def _dump_layer(name: str, layer: QuantMixin, store: _TensorStore) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "class": class_path(layer),
        "spec": layer.spec.model_dump(mode="json"),
        "quant_enabled": bool(layer.quant_enabled),
        "weight": None,
    }
    wq = layer.weight_quantizer
    if wq is not None and layer.quant_enabled:
        entry["weight"] = _dump_weight(name, layer, wq, store)
    for part in LAYER_PARTS:
        module = getattr(layer, part)
        entry[part] = dump_module(module, f"{name}.{part}", store.sink(f"{name}.{part}")) if module is not None else None
    return entry


@torch.no_grad()
def _dump_weight(name: str, layer: QuantMixin, wq: nn.Module, store: _TensorStore) -> dict[str, Any]:
    """Pack the weight's codes after checking that they decode to the weight the layer uses."""
    bits = getattr(wq, "bits", None)
    if not isinstance(bits, int):
        raise ExportError(f"{name}: weight quantizer {class_path(wq)} has no integer 'bits'")
    weight = layer.weight.detach()
    try:
        codes = wq.encode(weight)
        decoded = wq.decode(codes)
    except (NotImplementedError, AttributeError) as exc:
        raise ExportError(f"{name}: weight quantizer {class_path(wq)} cannot encode/decode codes ({exc})") from None
    used = layer.quantized_weight().detach()
    # The loaded layer computes with wq(decoded) (fake backend: same bits) or with decoded itself
    # (kernels, dequantization on the fly: same values; a zero may lose its sign).
    requantized = wq(decoded)
    exact = tensors.bitwise_equal(requantized, used) and torch.equal(decoded, used)
    if not exact:
        scale = used.abs().max().clamp(min=torch.finfo(used.dtype).tiny)
        err = float(torch.maximum((decoded - used).abs().max(), (requantized - used).abs().max()) / scale)
        if err > ULP_TOLERANCE:
            raise ExportError(
                f"{name}: the codes of {class_path(wq)} decode to a weight that differs from the one "
                f"the layer computes with (relative error {err:.2e}); its encode/decode must match forward"
            )
        logger.warning("%s: decoded weight differs from the layer's by %.1e (rounding); not bit-exact", name, err)
    key = store.add_packed(f"{name}.weight.codes", codes, bits)
    return {"codes": key, "bits": bits, "dtype": tensors.dtype_name(weight.dtype), "exact": exact}


def _dump_other_tensors(model: nn.Module, layers: dict[str, dict], store: _TensorStore) -> dict[str, str]:
    """Store every parameter and buffer not covered by a layer entry; returns tied-tensor aliases."""
    covered = tuple(f"{name}.{part}." for name in layers for part in LAYER_PARTS)
    packed = {f"{name}.weight" for name, entry in layers.items() if entry["weight"] is not None}
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for key, t in named:
        if key.startswith(covered) or key in packed:
            continue
        if id(t) in first_name:
            aliases[key] = first_name[id(t)]
            continue
        first_name[id(t)] = key
        store.add(key, t, lossy=True)
    return aliases


def _dump_corrector(index: int, corrector: Any, store: _TensorStore) -> dict[str, Any]:
    """An error corrector's method, config and the statistics its ``prepare`` measured."""
    where = f"correctors.{index}.{corrector.name}"
    state = {
        k: encode_value(v, where, store.sink(f"correctors.{index}"), k)
        for k, v in vars(corrector).items() if k != "config"
    }
    return {"method": corrector.name, "config": corrector.config.model_dump(mode="json"), "state": state}


def _save_scheduler(scheduler: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(scheduler, dict):
        (folder / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2, default=_json_default))
    else:
        scheduler.save_config(folder)


def _save_pipeline_components(pipeline: Any, attr: str, model_class: str, scheduler_class: str, root: Path) -> None:
    """The pipeline's other components (VAE, text encoder, tokenizer...) and its model_index.json.

    The pipeline is re-created without its denoiser, saved with ``save_pretrained``, and
    ``model_index.json`` is completed to name the quantized denoiser and the trial's scheduler
    (whose config ``_save_scheduler`` then writes over the pipeline's own).
    """
    components = dict(pipeline.components)
    components[attr] = None
    clone = type(pipeline)(**components)
    clone.save_pretrained(root, safe_serialization=True)
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text())
    index[attr] = ["diffusers", model_class]
    if "scheduler" in index:  # the scheduler the trial sampled with (saved by _save_scheduler)
        index["scheduler"] = ["diffusers", scheduler_class]
    index_path.write_text(json.dumps(index, indent=2))


def _json_default(value: Any) -> Any:
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
