"""Evaluation metrics: FID through torch-fidelity (``fid``), fidelity to the FP model
(``fidelity``: MSE/PSNR) and the zoo's ResNet-9 feature extractor ``res9-cifar10`` (``res9``).

Call ``from qsearch.metrics.fid import fid`` and ``from qsearch.metrics.fidelity import fidelity``
(the package attributes ``fid``/``fidelity`` are those submodules). Other names are imported
lazily: ``fidelity`` needs only torch, while ``fid``/``res9`` import torch-fidelity (and register
``res9-cifar10`` with it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FIDReference": "qsearch.metrics.fid",
    "get_reference": "qsearch.metrics.fid",
    "compare": "qsearch.metrics.fidelity",
    "Fidelity": "qsearch.metrics.fidelity",
    "mse": "qsearch.metrics.fidelity",
    "psnr": "qsearch.metrics.fidelity",
    "ResNet9": "qsearch.metrics.res9",
    "load_res9": "qsearch.metrics.res9",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
