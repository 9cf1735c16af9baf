"""Generic serialisation of the modules that method stages attach to quantized layers.

Stages replace a layer's ``act_quantizer``/``weight_quantizer`` with their own subclasses
(timestep-dependent scales, split quantizers, learned rounding) and set ``pre`` (smoothing, rotation)
and ``branch`` (low-rank) modules of their own classes. Export cannot know those classes, so it
stores any module as data, without pickle:

* its class, by import path (``methods.svdquant.LowRankBranch``);
* its plain attributes (``bits``, ``granularity``, a ``torch.Size``, a ``QuantSpec``, a dataclass
  of statistics...) as JSON;
* its parameters, buffers and tensor attributes as named tensors (written to safetensors);
* its child modules, recursively.

Loading rebuilds the object without calling its constructor (``cls.__new__`` + ``nn.Module``'s
bookkeeping), then restores attributes, tensors and children, so a class needs no special support
as long as its state is tensors, children and JSON-able attributes. What cannot be stored that way
(a hook, a lambda, an open file) is an ``ExportError`` at export time, naming the module and the
attribute, never a model that loads and silently computes something else. A class that is not
importable, or not in a trusted package, is a ``LoadError`` naming the class and the layer.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from qsearch.registry import ENTRY_POINT_GROUP

# Attributes that nn.Module.__init__ creates: managed by torch, never stored as plain attributes.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_HOOK_DICTS = tuple(k for k in _MODULE_INTERNALS if "hook" in k)

TRUSTED_PREFIXES = ("qsearch.", "methods.", "torch.nn.", "diffusers.")
"""Packages whose classes a model folder may name; plugins of ``qsearch.methods`` are added."""

_user_trusted: list[str] = []


class ExportError(ValueError):
    """A model that cannot be exported faithfully."""


class LoadError(ValueError):
    """An export folder that cannot be loaded faithfully (corrupt, incomplete, unknown class)."""


def class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def _plugin_prefixes() -> tuple[str, ...]:
    return tuple(f"{ep.value.split(':')[0].split('.')[0]}." for ep in entry_points(group=ENTRY_POINT_GROUP))


def trusted_prefixes() -> tuple[str, ...]:
    """Built-in trusted packages, installed ``qsearch.methods`` plugins, and ``trust``-ed ones."""
    return TRUSTED_PREFIXES + _plugin_prefixes() + tuple(_user_trusted)


def trust(package: str) -> None:
    """Allow model folders to name classes of ``package`` (one that is neither built in nor a plugin)."""
    prefix = package.rstrip(".") + "."
    if prefix not in _user_trusted:
        _user_trusted.append(prefix)


def import_class(path: str, where: str) -> type:
    """The class at ``path``; a clear ``LoadError`` if it is untrusted or cannot be imported."""
    if not path.startswith(trusted_prefixes()):
        raise LoadError(
            f"{where}: class {path} is not from a trusted package ({', '.join(trusted_prefixes())}); "
            "refusing to import it from a model folder"
        )
    module_name, _, qualname = path.rpartition(".")
    while module_name:
        try:
            obj: Any = importlib.import_module(module_name)
            break
        except ModuleNotFoundError:  # nested class: qualname has dots
            module_name, _, outer = module_name.rpartition(".")
            qualname = f"{outer}.{qualname}"
    else:
        raise LoadError(f"{where}: cannot import class {path}")
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise LoadError(
            f"{where}: class {path} does not exist in the installed packages "
            "(a method class that was renamed or removed, or a plugin that is not installed)"
        ) from None
    if not isinstance(obj, type):
        raise LoadError(f"{where}: {path} is not a class")
    return obj


# Plain values --------------------------------------------------------------------------------

TensorSink = Callable[[str, torch.Tensor], str]
"""Stores a tensor under a suggested name and returns the key it was stored under."""


def encode_value(value: Any, where: str, sink: TensorSink, name: str) -> Any:
    """A JSON form of an attribute value; tensors go to ``sink`` and are referenced by key."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"__tensor__": sink(name, value)}
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, enum.Enum):
        return {"__enum__": class_path(value), "value": encode_value(value.value, where, sink, name)}
    if isinstance(value, BaseModel):
        return {"__pydantic__": class_path(value), "data": value.model_dump(mode="json")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: encode_value(getattr(value, f.name), where, sink, f"{name}.{f.name}")
                  for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": class_path(value), "fields": fields}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [encode_value(v, where, sink, f"{name}.{i}") for i, v in enumerate(value)]
        kind = {list: "__list__", tuple: "__tuple__", set: "__set__", frozenset: "__frozenset__"}
        return {kind[type(value)] if type(value) in kind else "__tuple__": items}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: encode_value(v, where, sink, f"{name}.{k}") for k, v in value.items()}}
    raise ExportError(
        f"{where}: attribute {name!r} holds a {type(value).__name__}, which cannot be exported; "
        "keep module state in tensors, child modules and plain values"
    )


def decode_value(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode_value``."""
    if not isinstance(value, dict):
        return value
    ((tag, payload),) = [(k, v) for k, v in value.items() if k.startswith("__")]
    if tag == "__tensor__":
        return tensors[payload]
    if tag == "__size__":
        return torch.Size(payload)
    if tag == "__dtype__":
        return getattr(torch, payload)
    if tag == "__device__":
        return torch.device(payload)
    if tag == "__enum__":
        return import_class(payload, where)(decode_value(value["value"], where, tensors))
    if tag == "__pydantic__":
        return import_class(payload, where).model_validate(value["data"])
    if tag == "__dataclass__":
        fields = {k: decode_value(v, where, tensors) for k, v in value["fields"].items()}
        return import_class(payload, where)(**fields)
    if tag == "__dict__":
        return {k: decode_value(v, where, tensors) for k, v in payload.items()}
    items = [decode_value(v, where, tensors) for v in payload]
    return {"__list__": list, "__tuple__": tuple, "__set__": set, "__frozenset__": frozenset}[tag](items)


# Modules -----------------------------------------------------------------------------------


def dump_module(module: nn.Module, where: str, sink: TensorSink) -> dict[str, Any]:
    """A JSON description of ``module``; its tensors are handed to ``sink``."""
    hooked = [k for k in _HOOK_DICTS if getattr(module, k, None)]
    if hooked:
        raise ExportError(f"{where}: a {class_path(module)} with hooks ({', '.join(hooked)}) cannot be exported")
    get_extra = type(module).get_extra_state is not nn.Module.get_extra_state
    attrs = {
        k: encode_value(v, where, sink, k)
        for k, v in vars(module).items()
        if k not in _MODULE_INTERNALS
    }
    return {
        "class": class_path(module),
        "training": module.training,
        "attrs": attrs,
        "parameters": {
            k: {"key": sink(k, p), "requires_grad": p.requires_grad} if p is not None else None
            for k, p in module._parameters.items()
        },
        "buffers": {
            k: {"key": sink(k, b), "persistent": k not in module._non_persistent_buffers_set} if b is not None else None
            for k, b in module._buffers.items()
        },
        "extra_state": encode_value(module.get_extra_state(), where, sink, "_extra_state") if get_extra else None,
        "children": {
            k: dump_module(m, f"{where}.{k}", _prefixed(sink, k)) if m is not None else None
            for k, m in module._modules.items()
        },
    }


def _prefixed(sink: TensorSink, prefix: str) -> TensorSink:
    return lambda name, t: sink(f"{prefix}.{name}", t)


def build_module(spec: dict[str, Any], where: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a module from ``dump_module``'s description without calling its constructor."""
    cls = import_class(spec["class"], where)
    if not issubclass(cls, nn.Module):
        raise LoadError(f"{where}: {spec['class']} is not a torch module")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for k, v in spec["attrs"].items():
        object.__setattr__(module, k, decode_value(v, where, tensors))
    for k, p in spec["parameters"].items():
        param = nn.Parameter(_take(tensors, p["key"], where), p["requires_grad"]) if p is not None else None
        module.register_parameter(k, param)
    for k, b in spec["buffers"].items():
        buffer = _take(tensors, b["key"], where) if b is not None else None
        module.register_buffer(k, buffer, persistent=b is None or b["persistent"])
    for k, child in spec["children"].items():
        module._modules[k] = build_module(child, f"{where}.{k}", tensors) if child is not None else None
    if spec["extra_state"] is not None:
        module.set_extra_state(decode_value(spec["extra_state"], where, tensors))
    module.train(spec["training"])
    return module


def _take(tensors: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise LoadError(f"{where}: tensor {key!r} is missing from the weights file") from None
