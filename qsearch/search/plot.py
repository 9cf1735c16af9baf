"""The study plot: quality against size for every measured trial, the Pareto front as a staircase,
and the uniform baselines marked, so that one glance shows whether mixed precision pays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {"fid": "FID", "mse": "MSE to FP samples", "avg_weight_bits": "average weight bits",
          "model_mb": "model size (MiB)"}


def plot_front(trials: list[dict[str, Any]], front: list[dict[str, Any]], out: str | Path, *,
               quality: str, size: str, title: str = "", fp_quality: float | None = None) -> Path:
    """Write the plot as PNG. ``trials``: rows of ``qsearch.storage.trials``; ``front``: of ``pareto_front``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [t for t in trials if t["state"] == "COMPLETE" and quality in t["metrics"].get("full", {})]
    baselines = [t for t in measured if (t.get("origin") or "").startswith("uniform-")]
    others = [t for t in measured if t not in baselines]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter([t["metrics"]["full"][size] for t in others], [t["metrics"]["full"][quality] for t in others],
               s=14, color="0.6", label="trials", zorder=2)
    if front:
        xs, ys = [p["size"] for p in front], [p["quality"] for p in front]
        ax.step(xs, ys, where="post", color="tab:blue", zorder=3)
        ax.scatter(xs, ys, s=28, color="tab:blue", label="Pareto front", zorder=4)
    for t in baselines:
        full = t["metrics"]["full"]
        ax.scatter([full[size]], [full[quality]], marker="s", s=46, color="tab:red", zorder=5,
                   label="uniform" if t is baselines[0] else None)
        label = t["origin"].removeprefix("uniform-").upper() + ("" if t.get("feasible", True) else " (over budget)")
        ax.annotate(label, (full[size], full[quality]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8, color="tab:red")
    if fp_quality is not None:
        ax.axhline(fp_quality, color="k", linestyle=":", linewidth=1, label="full precision")
    ax.set_xlabel(LABELS.get(size, size))
    ax.set_ylabel(LABELS.get(quality, quality))
    if quality in ("fid", "mse"):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
