"""Finding the read-only reference zoo (``shared/zoo``) without hard-coded absolute paths.

The zoo travels beside checkouts (``<root>/shared/zoo``) on development and GPU machines, and may
live anywhere on a user's machine, so the lookup order is: ``$QSEARCH_ZOO``; then a ``shared/zoo``
folder in the current directory or any of its parents (which covers ``./shared/zoo`` and
``../shared/zoo``); then the same beside this file, for when the process runs from elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

ZOO_ENV = "QSEARCH_ZOO"


def find_zoo() -> Path | None:
    """The zoo folder, or ``None`` when there is none (``$QSEARCH_ZOO`` wins even if it is missing,
    so that a mistyped setting fails loudly later instead of silently picking another zoo)."""
    env = os.environ.get(ZOO_ENV)
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parent):
        for parent in (base, *base.parents):
            candidate = parent / "shared" / "zoo"
            if candidate.is_dir():
                return candidate
    return None


def zoo_path(*parts: str) -> Path:
    """``<zoo>/<parts...>``, raising a FileNotFoundError that says how to fix a missing zoo/file."""
    zoo = find_zoo()
    if zoo is None:
        raise FileNotFoundError(
            f"no reference zoo found (no shared/zoo beside the working directory or the package); "
            f"set {ZOO_ENV} to the folder holding it"
        )
    path = zoo.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (zoo: {zoo}; set {ZOO_ENV} to change it)")
    return path
