"""Which trial of a study to export: a trial number, or a point of the Pareto front under a budget.

The front comes from the study database (``qsearch.storage.pareto_front``) as one row per trial;
a row names its trial (``number``), its measured FID (``fid``) and its average weight bits
(``avg_weight_bits``), either at the top level or under ``metrics``.
"""

from __future__ import annotations

from typing import Any

_KEYS = {
    "number": ("number", "trial", "trial_number"),
    "fid": ("fid",),
    "bits": ("avg_weight_bits", "bits", "avg_bits"),
}


def field(row: dict[str, Any], what: str) -> Any:
    """A row's trial number, FID or bits, wherever the storage put it (``None`` if absent)."""
    for place in (row, row.get("metrics") or {}, row.get("values") or {}):
        for key in _KEYS[what]:
            if key in place and place[key] is not None:
                return place[key]
    return None


def choose_point(
    front: list[dict[str, Any]],
    *,
    trial: int | None = None,
    max_bits: float | None = None,
    max_fid: float | None = None,
) -> dict[str, Any]:
    """The row to export; exactly one of ``trial``, ``max_bits``, ``max_fid`` must be given.

    ``max_bits``: the best FID among points with average weight bits ``<= max_bits`` (ties: fewer
    bits). ``max_fid``: the fewest bits among points with FID ``<= max_fid`` (ties: better FID).
    ``trial``: that trial's row, or ``{"number": trial}`` when it is not on the front.
    """
    given = [x is not None for x in (trial, max_bits, max_fid)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --trial, --max-bits, --max-fid")
    if trial is not None:
        return next((r for r in front if field(r, "number") == trial), {"number": trial})
    rows = [r for r in front if field(r, "fid") is not None and field(r, "bits") is not None]
    if max_bits is not None:
        fits = [r for r in rows if field(r, "bits") <= max_bits]
        key = lambda r: (field(r, "fid"), field(r, "bits"))  # noqa: E731
        budget = f"average weight bits <= {max_bits}"
    else:
        fits = [r for r in rows if field(r, "fid") <= max_fid]
        key = lambda r: (field(r, "bits"), field(r, "fid"))  # noqa: E731
        budget = f"FID <= {max_fid}"
    if not fits:
        known = ", ".join(f"#{field(r, 'number')}: {field(r, 'bits'):.3g} bits, FID {field(r, 'fid'):.4g}" for r in rows)
        raise ValueError(f"no Pareto point has {budget} (front: {known or 'empty'})")
    return min(fits, key=key)
