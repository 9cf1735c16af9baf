"""ResNet-9 CIFAR-10 classifier of the zoo, as a torch-fidelity feature extractor (``res9-cifar10``).

Why: Inception-v3 weights cannot be downloaded on the machines this project is tested on, so FID is
measured in the 512-d penultimate feature space of a small CIFAR-10 classifier (``FID-res9``). Its
values are comparable between runs here, not with papers' Inception FID.

Architecture (``shared/zoo/README.md``; submodule names follow the keys of ``res9.safetensors``, so
``load_state_dict(strict=True)`` checks it): every ``conv`` is 3x3, no bias, + BatchNorm + ReLU::

    prep: conv 3->64
    l1:   conv 64->128, maxpool 2      r1: 2x conv 128 (residual: x + r1(x))
    l2:   conv 128->256, maxpool 2
    l3:   conv 256->512, maxpool 2     r3: 2x conv 512 (residual: x + r3(x))
    global max pool -> 512 features;  fc 512->10 (no bias), logits x 0.125

Input preprocessing (found by measurement, ``PREPROCESSING``): uint8 RGB images mapped to [-1, 1]
by ``u / 127.5 - 1``; no per-channel mean/std. Measured with ``qsearch.metrics.fid.fid`` (i.e. by
torch-fidelity) on the CIFAR-10 test JPEGs of ``cifar10-jpeg.tar.xz`` against the reference
statistics of the 50,000 training images (``cifar10_train_res9_stats.npz``), fp32 features:

    ======================================  ========  ========  ========  ========
    preprocessing of uint8 ``u``            10k FID   2k FID    1k FID    accuracy
    ======================================  ========  ========  ========  ========
    ``u / 127.5 - 1``  ([-1, 1]): used      1.0216    2.728     5.02      90.49 %
    ``(u - 128) / 128``                     1.0218    2.728     5.02
    ``u / 255``  ([0, 1])                   43.34     44.01     46.15     74.01 %
    ``(u/255 - mean) / std``, std 0.247..   17.12     18.02     19.85     81.93 %
    ``(u/255 - mean) / std``, std 0.202..   33.57     34.33     36.28
    ``u``  ([0, 255])                       674,800
    ======================================  ========  ========  ========  ========

(2k/1k: the first images in the class-interleaved order of ``tests/metrics/conftest.py``.) Only the
[-1, 1] mappings reproduce the README's 1.02 and 90.5 % test accuracy; ``u / 127.5 - 1`` is the
exact inverse of how float samples in [-1, 1] become uint8 (``round((x + 1) * 127.5)``, clamped, in
``qsearch.metrics.fid.to_uint8``), the range of the diffusion models' outputs. The same 10k FID is
1.02159 on CPU and on CUDA with TF32 convolutions off (1.02170 with TF32), so the extractor turns
TF32 off for its convolutions: GPU and CPU runs then agree to about 1e-6.

Configuration: weights come from the ``feature_extractor_weights_path`` argument (torch-fidelity's
own keyword), else ``$QSEARCH_RES9``, else ``<zoo>/cifar10-res9/res9.safetensors`` (``find_zoo``).
Importing this module registers the extractor with torch-fidelity.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from qsearch.zoo import zoo_path

NAME = "res9-cifar10"
WEIGHTS_ENV = "QSEARCH_RES9"
WEIGHTS_FILE = ("cifar10-res9", "res9.safetensors")
STATS_FILE = ("cifar10-res9", "cifar10_train_res9_stats.npz")
PREPROCESSING = "uint8 RGB -> x / 127.5 - 1 (range [-1, 1]); no mean/std normalization"
IMAGE_SIZE = 32


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResNet9(nn.Module):
    """The zoo's ResNet-9; ``forward`` takes images in [-1, 1] and returns the 512-d features."""

    FEATURES = 512
    LOGIT_SCALE = 0.125

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.prep = _conv_bn(3, 64)
        self.l1 = nn.Sequential(_conv_bn(64, 128), nn.MaxPool2d(2))
        self.r1 = nn.Sequential(_conv_bn(128, 128), _conv_bn(128, 128))
        self.l2 = nn.Sequential(_conv_bn(128, 256), nn.MaxPool2d(2))
        self.l3 = nn.Sequential(_conv_bn(256, 512), nn.MaxPool2d(2))
        self.r3 = nn.Sequential(_conv_bn(512, 512), _conv_bn(512, 512))
        self.fc = nn.Linear(512, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) in [-1, 1] -> (N, 512) penultimate features (global max pool)."""
        x = self.prep(x)
        x = self.l1(x)
        x = x + self.r1(x)
        x = self.l2(x)
        x = self.l3(x)
        x = x + self.r3(x)
        return torch.amax(x, dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (CIFAR-10 order), scaled by 0.125 as in training."""
        return self.fc(self(x)) * self.LOGIT_SCALE


def uint8_to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the network's input range [-1, 1] (``PREPROCESSING``)."""
    return x.float() / 127.5 - 1.0


def default_weights_path() -> Path:
    """``$QSEARCH_RES9`` if set, else the zoo's ``cifar10-res9/res9.safetensors``."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${WEIGHTS_ENV}={env}: no such file")
        return path
    return zoo_path(*WEIGHTS_FILE)


def default_stats_path() -> Path:
    """The zoo's reference statistics of the 50,000 CIFAR-10 training images."""
    return zoo_path(*STATS_FILE)


@functools.lru_cache(maxsize=4)
def _state_dict(path: str) -> dict[str, torch.Tensor]:
    # torch-fidelity builds a new extractor for every metrics call; reading the file once per process
    # keeps repeated FID evaluations (one per search trial) from re-reading 13 MB each time.
    from safetensors.torch import load_file

    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}


def load_res9(path: str | Path | None = None, device: str | torch.device = "cpu") -> ResNet9:
    """The ResNet-9 with its weights (fp16 on disk, fp32 here), strictly loaded, in eval mode."""
    path = Path(path) if path is not None else default_weights_path()
    model = ResNet9()
    model.load_state_dict(_state_dict(str(path.resolve())), strict=True)
    return model.eval().requires_grad_(False).to(device)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full fp32 convolutions on CUDA, so FID-res9 does not depend on the device (TF32: ~1e-4)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


class Res9FeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor: uint8 (N, 3, 32, 32) -> ``'512'`` features, ``'logits'``.

    Features are returned as float64 so that torch-fidelity's FID statistics have the dtype of the
    reference ``.npz`` (its ``fid_statistics_to_metric`` asserts equal dtypes of both inputs' ``mu``).
    """

    FEATURES_DTYPE = torch.float64

    def __init__(
        self,
        name: str,
        features_list: list[str] | tuple[str, ...],
        feature_extractor_weights_path: str | Path | None = None,
        feature_extractor_internal_dtype: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_internal_dtype not in (None, "float32", "float64"):
            raise ValueError(f"{name}: internal dtype must be float32 or float64")
        self.internal_dtype = torch.float64 if feature_extractor_internal_dtype == "float64" else torch.float32
        self.net = load_res9(feature_extractor_weights_path).to(self.internal_dtype)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("512", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "512", "kid": "512", "prc": "512"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8):
            raise TypeError(f"{self.name} expects uint8 images, as torch-fidelity passes them")
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"{self.name} is a CIFAR-10 classifier and takes (N, 3, 32, 32) images, got "
                f"{tuple(x.shape)}; use feature_extractor='inception-v3-compat' for other sizes"
            )
        with _no_tf32():
            feats = self.net(uint8_to_input(x).to(self.internal_dtype))
        out = {"512": feats}
        if "logits" in self.features_list:
            out["logits"] = self.net.fc(feats) * self.net.LOGIT_SCALE
        return tuple(out[name].to(self.FEATURES_DTYPE) for name in self.features_list)


def register() -> None:
    """Register ``res9-cifar10`` with torch-fidelity (idempotent: torch-fidelity refuses duplicates)."""
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(NAME, Res9FeatureExtractor)


register()
