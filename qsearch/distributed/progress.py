"""The one live view of a distributed study: the study's counts and front, and a row per worker."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from qsearch.distributed.driver import LaunchView


def render(view: LaunchView) -> Group:
    """Study totals (done / running / failed, the front so far) above a table of the workers."""
    s = view.status
    totals = Table(title=f"distributed study ({view.elapsed_s:.0f} s)", show_header=False)
    totals.add_column(justify="right")
    totals.add_column()
    totals.add_row("finished", f"{s.finished} / {s.n_trials}")
    totals.add_row("running / queued", f"{s.running} / {s.waiting}")
    totals.add_row("complete", str(s.complete))
    totals.add_row("pruned (proxy / budget)", f"{s.pruned_proxy} / {s.pruned_infeasible}")
    totals.add_row("failed", str(s.failed))
    totals.add_row("workers died / replaced", f"{view.deaths} / {view.respawns}")
    quality, size = s.objectives
    front = ", ".join(f"#{n}: {z:.3g} {size} -> {q:.4g} {quality}" for n, q, z in s.front[:8])
    totals.add_row("front", front or "-")
    workers = Table(title="workers")
    for col in ("worker", "host", "pid", "state", "trial", "done", "s / trial"):
        workers.add_column(col, justify="left" if col in ("host", "state", "done") else "right")
    for w in view.workers:
        seconds = w.get("trial_seconds") or []
        done = ", ".join(f"{k.lower()} {v}" for k, v in sorted((w.get("done") or {}).items())) or "-"
        workers.add_row(str(w.get("worker", "?")), str(w.get("host", "-")), str(w.get("pid", "-")),
                        str(w.get("state", "-")), "-" if w.get("trial") is None else str(w["trial"]), done,
                        f"{sum(seconds) / len(seconds):.1f}" if seconds else "-")
    return Group(totals, workers)
