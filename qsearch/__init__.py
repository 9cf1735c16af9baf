"""qsearch: quantize diffusion models with composable survey methods and search mixed precision.

Layout: ``registry`` (method registry), ``stages`` (the four stage kinds), ``quant`` (quantization
engine), ``recipe`` (recipe files), ``engine`` (apply and evaluate a recipe), ``search`` (Optuna
studies), ``storage`` (results database), ``distributed`` (Ray), ``export`` (packed models), ``cli``.
"""

from qsearch.registry import REGISTRY, register

__version__ = "0.1.0"
__all__ = ["REGISTRY", "register", "__version__"]
