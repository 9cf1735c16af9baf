"""Distributed studies: many Ray workers running one Optuna study on one database, surviving worker deaths.

The names are imported lazily: Ray unpickles the launch's ``Board`` actor by importing
``qsearch.distributed.board``, which imports this package first; importing the driver here would make
that small actor's process import torch and diffusers (seconds) for nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LaunchResult", "LaunchView", "launch", "shared_url"]


def __getattr__(name: str) -> Any:
    if name in ("LaunchResult", "LaunchView", "launch"):
        from qsearch.distributed import driver

        return getattr(driver, name)
    if name == "shared_url":
        from qsearch.distributed.storage import shared_url

        return shared_url
    raise AttributeError(f"module 'qsearch.distributed' has no attribute {name!r}")
