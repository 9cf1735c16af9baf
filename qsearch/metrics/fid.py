"""FID of generated samples, computed by torch-fidelity with any registered feature extractor.

Why torch-fidelity does the arithmetic: its Frechet distance, statistics and caches are the ones
papers' numbers come from, so ``extractor="inception-v3-compat"`` with ``reference="cifar10-train"``
is the standard Inception FID on a machine that can download its weights, and the offline default
(``res9-cifar10`` against the zoo's training-set statistics) goes through exactly the same code.

Precomputed statistics (``.npz`` with ``mu``/``sigma``): torch-fidelity 0.4.0 has no
``fid_statistics_file`` option, but it looks FID statistics of an input up in its file cache under
``{cache_root}/{input2_cache_name}-{extractor}-stat-fid-{layer}.pt`` before touching the input.
``FIDReference`` writes the ``.npz`` statistics there once per process (in a private temporary
cache folder) and passes a placeholder ``input2`` that raises if it is ever read, so torch-fidelity
computes FID from the file's statistics and nothing is faked.

References: a ``.npz`` file; an image folder or a torch-fidelity registered input name (e.g.
``"cifar10-train"``), whose features torch-fidelity extracts and caches itself; a ``FIDReference``
(e.g. ``FIDReference.from_images(fp_samples)`` to compare many quantized runs with one FP set); or
images (a tensor in [-1, 1], or uint8), read as torch-fidelity's second input on every call.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from qsearch.metrics import res9  # noqa: F401  (registers "res9-cifar10" with torch-fidelity)

Images = Union[torch.Tensor, Iterable[torch.Tensor]]
DEFAULT_EXTRACTOR = res9.NAME
INCEPTION = "inception-v3-compat"
DEFAULT_BATCH_SIZE = 256


# ----------------------------------------------------------------------------------------- images
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 on the CPU, rounded as when saving a PNG (uint8 passes through).

    torch-fidelity's extractors take uint8, and the reference statistics were computed from uint8
    files, so samples are quantized the same way before their features are extracted.
    """
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    images = images.detach()
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def as_uint8_images(images: Images) -> torch.Tensor:
    """A tensor or an iterable of batches (N, 3, H, W) -> one uint8 (N, 3, H, W) CPU tensor."""
    if torch.is_tensor(images):
        out = to_uint8(images)
    else:
        batches = [to_uint8(b) for b in images]  # converted batch by batch: 1/4 of float memory
        if not batches:
            raise ValueError("no images")
        out = torch.cat(batches)
    if out.dim() != 4 or out.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(out.shape)}")
    if out.shape[0] < 2:
        raise ValueError("FID needs at least 2 images (it estimates a covariance)")
    return out


class UInt8Images(Dataset):
    """A uint8 (N, 3, H, W) tensor as the Dataset that torch-fidelity reads."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class _StatisticsOnly(Dataset):
    """Placeholder ``input2`` for a reference known only by its statistics (see module docstring)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> torch.Tensor:
        raise RuntimeError(
            "FID reference statistics were not found in torch-fidelity's cache; this reference has no images"
        )


# -------------------------------------------------------------------------------------- references
def _fid_layer(extractor: str) -> str:
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor {extractor!r}; registered: {list(FEATURE_EXTRACTORS_REGISTRY)}")
    return FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")


def _mu_dtype(extractor: str) -> np.dtype:
    # torch-fidelity asserts equal dtypes of both inputs' mu; its built-in extractors emit float32
    # features (mu float32, sigma float64 from np.cov), res9-cifar10 emits float64.
    dtype = getattr(FEATURE_EXTRACTORS_REGISTRY[extractor], "FEATURES_DTYPE", torch.float32)
    return np.dtype(str(dtype).removeprefix("torch."))


_STATS_DIR: Path | None = None


def _stats_dir() -> Path:
    """A private, per-process torch-fidelity cache folder for statistics-only references."""
    global _STATS_DIR
    if _STATS_DIR is None:
        _STATS_DIR = Path(tempfile.mkdtemp(prefix="qsearch-fid-"))
        atexit.register(shutil.rmtree, _STATS_DIR, ignore_errors=True)
    return _STATS_DIR


_ids = itertools.count()


@dataclass(eq=False)
class FIDReference:
    """The second set of an FID: statistics (``mu``, ``sigma``) or an ``input`` torch-fidelity reads.

    Resolve references with ``get_reference`` (cached per process), or build one from images with
    ``from_images``.
    """

    name: str
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    input: str | None = None
    source: str = ""
    extractor: str | None = None  # the extractor the statistics were computed with, where known

    @classmethod
    def from_statistics(
        cls, mu: np.ndarray, sigma: np.ndarray, name: str | None = None, source: str = "", extractor: str | None = None
    ) -> FIDReference:
        mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"bad FID statistics: mu {mu.shape}, sigma {sigma.shape}")
        if name is None:
            digest = hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()[:16]
            name = f"qsearch-stats-{digest}"
        return cls(name=name, mu=mu, sigma=sigma, source=source or name, extractor=extractor)

    @classmethod
    def from_npz(cls, path: str | Path) -> FIDReference:
        """Statistics from an ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid / torch-fidelity layout)."""
        path = Path(path)
        with np.load(path) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: missing {sorted(missing)} (has {data.files})")
            return cls.from_statistics(data["mu"], data["sigma"], source=str(path))

    @classmethod
    def from_images(
        cls,
        images: Images,
        *,
        extractor: str = DEFAULT_EXTRACTOR,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | torch.device | None = None,
        weights_path: str | Path | None = None,
        verbose: bool = False,
    ) -> FIDReference:
        """Statistics of images (e.g. FP samples), computed once by torch-fidelity's own functions,
        so many later ``fid`` calls against them only extract features of their own samples."""
        from torch_fidelity.metric_fid import fid_input_id_to_statistics
        from torch_fidelity.utils import create_feature_extractor

        layer = _fid_layer(extractor)
        kwargs = _common_kwargs(extractor, batch_size, device, weights_path, verbose)
        kwargs["input1"] = UInt8Images(as_uint8_images(images))
        with _cuda_context(device):
            fe = create_feature_extractor(extractor, [layer], **kwargs)
            stats = fid_input_id_to_statistics(1, fe, layer, **kwargs)
        return cls.from_statistics(
            stats["mu"], stats["sigma"], name=f"qsearch-images-{os.getpid()}-{next(_ids)}",
            source=f"{len(kwargs['input1'])} images", extractor=extractor,
        )

    def torch_fidelity_kwargs(self, extractor: str, cache_root: str | Path | None = None) -> dict[str, Any]:
        """The ``input2`` keywords of ``torch_fidelity.calculate_metrics`` for this reference."""
        if self.input is not None:
            kwargs: dict[str, Any] = {"input2": self.input}
            if self.input not in DATASETS_REGISTRY:  # registered inputs are cached under their name
                kwargs["input2_cache_name"] = self.name
            if cache_root is not None:
                kwargs["cache_root"] = str(cache_root)
            return kwargs
        if self.extractor is not None and self.extractor != extractor:
            raise ValueError(f"reference statistics were computed with {self.extractor!r}, not {extractor!r}")
        root = _stats_dir()
        path = root / f"{self.name}-{extractor}-stat-fid-{_fid_layer(extractor)}.pt"
        if not path.exists():  # written once per process and extractor (mu in that extractor's dtype)
            torch.save({"mu": self.mu.astype(_mu_dtype(extractor)), "sigma": self.sigma.astype(np.float64)}, path)
        return {"input2": _StatisticsOnly(), "input2_cache_name": self.name, "cache_root": str(root), "cache": True}


def default_reference(extractor: str) -> str | Path:
    """The reference of an extractor when none is given: the zoo's CIFAR-10 training statistics for
    res9-cifar10, torch-fidelity's ``cifar10-train`` for Inception (downloaded on first use)."""
    if extractor == DEFAULT_EXTRACTOR:
        return res9.default_stats_path()
    if extractor == INCEPTION:
        return "cifar10-train"
    raise ValueError(f"no default FID reference for extractor {extractor!r}; pass reference=")


_REFERENCES: dict[tuple[str, str], FIDReference] = {}


def get_reference(reference: str | Path | FIDReference | None, extractor: str = DEFAULT_EXTRACTOR) -> FIDReference:
    """Resolve a reference once per process (a ``.npz`` is read and hashed only the first time)."""
    if isinstance(reference, FIDReference):
        return reference
    if reference is None:
        reference = default_reference(extractor)
    registered = isinstance(reference, str) and reference in DATASETS_REGISTRY
    key = (str(reference) if registered else str(Path(reference).expanduser().resolve()), extractor)
    if key in _REFERENCES:
        return _REFERENCES[key]
    if registered:
        ref = FIDReference(name=str(reference), input=str(reference), source=str(reference))
    else:
        path = Path(reference).expanduser()
        if path.is_file() and path.suffix == ".npz":
            ref = FIDReference.from_npz(path)
        elif path.is_dir():
            # torch-fidelity caches the folder's features under this name, so the name changes with
            # the folder's path and contents (count and latest modification time of its files).
            files = [p for p in path.rglob("*") if p.is_file()]
            stamp = f"{path.resolve()}|{len(files)}|{max((p.stat().st_mtime_ns for p in files), default=0)}"
            ref = FIDReference(name=f"qsearch-dir-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}",
                               input=str(path), source=str(path))
        else:
            raise FileNotFoundError(
                f"FID reference {reference!r} is neither a .npz file, an image folder, nor a torch-fidelity "
                f"input ({', '.join(DATASETS_REGISTRY)})"
            )
    _REFERENCES[key] = ref
    return ref


# --------------------------------------------------------------------------------------------- FID
def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cuda_context(device: str | torch.device | None) -> contextlib.AbstractContextManager:
    # torch-fidelity moves its extractor with ``.cuda()``, i.e. to the current CUDA device.
    dev = _device(device)
    return torch.cuda.device(dev) if dev.type == "cuda" and dev.index is not None else contextlib.nullcontext()


def _common_kwargs(
    extractor: str, batch_size: int, device: str | torch.device | None, weights_path: str | Path | None, verbose: bool
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "fid": True,
        "feature_extractor": extractor,
        "batch_size": batch_size,
        "cuda": _device(device).type == "cuda",
        "verbose": verbose,
        # In-memory inputs: DataLoader worker processes would only add start-up time (this is the
        # only effect of save_cpu_ram in torch-fidelity 0.4.0: num_workers=0).
        "save_cpu_ram": True,
    }
    if weights_path is not None:  # res9 weights, or a local Inception .pth on an offline machine
        kwargs["feature_extractor_weights_path"] = str(weights_path)
    return kwargs


def _is_images(reference: object) -> bool:
    return torch.is_tensor(reference) or (
        isinstance(reference, Iterable) and not isinstance(reference, (str, bytes, os.PathLike))
    )


def fid(
    samples: Images,
    *,
    extractor: str = DEFAULT_EXTRACTOR,
    reference: str | Path | FIDReference | Images | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    weights_path: str | Path | None = None,
    cache_root: str | Path | None = None,
    verbose: bool = False,
) -> float:
    """FID between ``samples`` (float in [-1, 1] or uint8, (N, 3, H, W), a tensor or batches) and a
    reference, computed by ``torch_fidelity.calculate_metrics``.

    ``reference``: ``None`` (the extractor's default, ``default_reference``), a stats ``.npz``, an
    image folder, a torch-fidelity input name, a ``FIDReference``, or images. ``device``: ``None`` or
    ``"auto"`` picks CUDA when available. ``weights_path``: the extractor's weights (else
    ``$QSEARCH_RES9`` / the zoo for res9). ``cache_root``: torch-fidelity's cache for folder and
    registered references (its default: ``$TORCH_HOME/fidelity_cache``).
    """
    kwargs = _common_kwargs(extractor, batch_size, device, weights_path, verbose)
    kwargs["input1"] = UInt8Images(as_uint8_images(samples))
    if _is_images(reference):
        kwargs["input2"] = UInt8Images(as_uint8_images(reference))  # type: ignore[arg-type]
    else:
        kwargs.update(get_reference(reference, extractor).torch_fidelity_kwargs(extractor, cache_root))  # type: ignore[arg-type]
    with _cuda_context(device):
        metrics = torch_fidelity.calculate_metrics(**kwargs)
    return float(metrics[torch_fidelity.KEY_METRIC_FID])
