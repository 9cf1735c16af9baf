"""qsearch: quantize diffusion models with composable survey methods and search mixed precision.

Layout: ``registry`` (method registry), ``stages`` (the four stage kinds), ``quant`` (quantization
engine), ``recipe`` (recipe files), ``engine`` (apply and evaluate a recipe), ``search`` (Optuna
studies), ``storage`` (results database), ``distributed`` (Ray), ``export`` (packed models), ``cli``.
"""

from typing import Any

from qsearch.registry import REGISTRY, register

__version__ = "0.1.0"
__all__ = ["REGISTRY", "register", "load", "__version__"]


def __getattr__(name: str) -> Any:
    """``qsearch.load(DIR)`` loads an exported model; imported lazily (export pulls in safetensors
    and the kernels' backends, which ``import qsearch`` alone should not pay for)."""
    if name == "load":
        from qsearch.export import load

        return load
    raise AttributeError(f"module 'qsearch' has no attribute {name!r}")
