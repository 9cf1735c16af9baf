"""Export a quantized model as packed low-bit weights, and load it back as a diffusers model.

``export_model(ctx, DIR, recipe=..., provenance=...)`` writes the folder (``writer``);
``load(DIR, backend=...)`` reads it (``loader``), choosing a kernel per layer (``backends``).
"""

from qsearch.export.backends import BackendFallbackWarning
from qsearch.export.integrity import IntegrityError
from qsearch.export.loader import export_sampler, load
from qsearch.export.serialize import ExportError, LoadError
from qsearch.export.writer import export_model

__all__ = [
    "BackendFallbackWarning", "ExportError", "IntegrityError", "LoadError", "export_model",
    "export_sampler", "load",
]
