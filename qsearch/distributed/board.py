"""The board of one launch: where its workers post their state and read the stop flag.

A small Ray actor (it imports nothing heavy, so it starts in about a second): worker state is
transient and belongs in memory, not in the study database, which is left to trials. Workers post
with fire-and-forget calls; the driver reads ``snapshot`` once per poll for its progress view.
"""

from __future__ import annotations

from typing import Any


class Board:
    """Latest state of every worker of one launch, and the launch's polite-stop flag."""

    def __init__(self) -> None:
        self._workers: dict[int, dict[str, Any]] = {}
        self._stop = False

    def post(self, index: int, info: dict[str, Any]) -> None:
        self._workers.setdefault(index, {"worker": index}).update(info)

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return {i: dict(w) for i, w in self._workers.items()}

    def stop(self) -> None:
        self._stop = True

    def stopped(self) -> bool:
        return self._stop
