"""Fixtures of the metrics tests: real CIFAR-10 test images from the shared JPEG archive.

The archive is read once per process (its test images sit at the end of an 18 MB xz stream, a few
seconds to reach); decoded sets are cached in memory by size. The order interleaves the classes
(image 0 of every class, then image 1, ...), so any prefix is class-balanced like the reference.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from qsearch.zoo import find_zoo

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_JPEGS: list[tuple[int, bytes]] | None = None
_DECODED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def cifar10_archive() -> Path | None:
    """``$QSEARCH_CIFAR10``, else ``<zoo>/../datasets/cifar10/cifar10-jpeg.tar.xz``."""
    if os.environ.get("QSEARCH_CIFAR10"):
        return Path(os.environ["QSEARCH_CIFAR10"])
    zoo = find_zoo()
    if zoo is None:
        return None
    path = zoo.parent / "datasets" / "cifar10" / "cifar10-jpeg.tar.xz"
    return path if path.is_file() else None


def _test_jpegs(archive: Path) -> list[tuple[int, bytes]]:
    global _JPEGS
    if _JPEGS is None:
        found: list[tuple[str, int, bytes]] = []
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) == 3 and parts[0] == "test":
                    found.append((parts[2], CLASSES.index(parts[1]), tar.extractfile(member).read()))
        found.sort(key=lambda item: (item[0], item[1]))  # file name, then class: classes interleave
        _JPEGS = [(label, data) for _, label, data in found]
    return _JPEGS


def load_cifar10_test(archive: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images as float (n, 3, 32, 32) in [-1, 1], and their labels."""
    larger = [m for m in _DECODED if m >= n]
    if larger:
        images, labels = _DECODED[min(larger)]
        return images[:n], labels[:n]
    if n not in _DECODED:
        from PIL import Image

        jpegs = _test_jpegs(archive)[:n]
        if len(jpegs) < n:
            raise ValueError(f"only {len(jpegs)} test images")
        arrays = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, data in jpegs])
        images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
        _DECODED[n] = (images, torch.tensor([label for label, _ in jpegs]))
    return _DECODED[n]


@pytest.fixture(scope="session")
def cifar10_test() -> Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """``cifar10_test(n)`` -> n CIFAR-10 test images in [-1, 1]; ``labels=True`` adds their labels."""
    archive = cifar10_archive()
    if archive is None:
        pytest.skip("CIFAR-10 JPEG archive not found (shared/datasets/cifar10 beside the zoo)")

    def get(n: int, labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        images, y = load_cifar10_test(archive, n)
        return (images, y) if labels else images

    return get
