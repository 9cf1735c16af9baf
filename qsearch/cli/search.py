"""``qsearch search``, ``studies``, ``pareto``, ``show``: run a study and read its results.

``qsearch search SPACE.yaml`` resumes the study of the space's name when the database has it, so
running the same command again after Ctrl-C (or with a larger ``--trials``) continues the study.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
import yaml
from rich.live import Live
from rich.table import Table

from qsearch.cli.main import app, console, fail, quiet_libraries
from qsearch.recipe import RecipeError
from qsearch.storage.db import DEFAULT_URL

STORAGE = typer.Option(DEFAULT_URL, "--storage", help="SQLAlchemy URL of the study database")


def _status_table(status, started: float) -> Table:
    """The live view: trials by state, full evaluations saved, the front so far."""
    table = Table(title=f"study progress ({time.perf_counter() - started:.0f} s)", show_header=False)
    table.add_column(justify="right")
    table.add_column()
    table.add_row("finished", f"{status.finished} / {status.n_trials}")
    table.add_row("running", str(status.running))
    table.add_row("complete", str(status.complete))
    table.add_row("pruned (proxy / budget)", f"{status.pruned_proxy} / {status.pruned_infeasible}")
    table.add_row("failed", str(status.failed))
    table.add_row("full evaluations saved", str(status.full_evaluations_saved))
    quality, size = status.objectives
    front = ", ".join(f"#{n}: {z:.3g} {size} -> {q:.4g} {quality}" for n, q, z in status.front[:8])
    table.add_row("front", front or "-")
    table.add_row("last", status.last or "-")
    return table


def _pareto_table(study: str, front: list[dict], baselines: list[dict], quality: str, size: str) -> Table:
    """The front sorted by size, then the uniform baselines that are not on it (in red, with why)."""
    n = next((p["metrics"].get("n_samples") for p in front if p["metrics"].get("n_samples")), None)
    measured = f", {quality} on {int(n)} samples" if n else ""
    table = Table(title=f"Pareto front of {study}{measured}")
    for col in ("trial", size, quality, "origin"):
        table.add_column(col, justify="right" if col != "origin" else "left")
    for p in front:
        table.add_row(str(p["number"]), f"{p['size']:.4g}", f"{p['quality']:.4g}", p["origin"] or "")
    for t in baselines:
        if all(p["number"] != t["number"] for p in front):
            full = t["metrics"]["full"]
            why = "dominated" if t["feasible"] else "over budget"
            table.add_row(f"[red]{t['number']}[/]", f"[red]{full.get(size, float('nan')):.4g}[/]",
                          f"[red]{full.get(quality, float('nan')):.4g}[/]", f"[red]{t['origin']} ({why})[/]")
    return table


def _front_table(storage: str, study: str) -> Table:
    """The Pareto table of a study as stored (what ``qsearch pareto`` prints)."""
    from qsearch.storage import pareto_front, study_spec, trials as all_trials

    objectives = study_spec(storage, study)["json"].get("objectives", {})
    quality, size = objectives.get("quality", "fid"), objectives.get("size", "avg_weight_bits")
    return _pareto_table(study, pareto_front(storage, study), _baselines(all_trials(storage, study)),
                         quality, size)


def _baselines(rows: list[dict]) -> list[dict]:
    """The measured uniform configurations (the enqueued baselines)."""
    return [t for t in rows if (t["origin"] or "").startswith("uniform-") and t["state"] == "COMPLETE"]


@app.command()
def search(
    space_file: Path = typer.Argument(..., help="search-space YAML file"),
    trials: int = typer.Option(None, "--trials", "-n", help="finished trials to reach (default: the space's)"),
    storage: str = STORAGE,
    device: str = typer.Option(None, "--device", help="override base.eval.device"),
) -> None:
    """Run (or resume) the study of a search space: Pareto front of quality against bits."""
    quiet_libraries()
    from qsearch.search.space import load_space
    from qsearch.search.study import open_study, run_trials, study_status

    try:
        space = load_space(space_file)
    except RecipeError as exc:
        fail(str(exc))
    if device:
        space.base.setdefault("eval", {})["device"] = device
    n_trials = trials or space.trials
    try:
        study = open_study(space, storage)
    except ValueError as exc:
        fail(str(exc))
    started = time.perf_counter()
    status = study_status(study, n_trials)
    if status.finished:
        console.print(f"resuming study {space.name!r}: {status.finished} finished trials")
    try:
        with Live(_status_table(status, started), console=console, refresh_per_second=2) as live:
            run_trials(space, study, n_trials, progress=lambda s: live.update(_status_table(s, started)))
    except KeyboardInterrupt:
        status = study_status(study, n_trials)
        console.print(f"[yellow]interrupted:[/] {status.finished} finished trials are kept; "
                      f"run the same command to continue")
        raise typer.Exit(130)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    status = study_status(study, n_trials)
    console.print(_status_table(status, started))
    console.print(_front_table(storage, space.name))
    console.print(f"study {space.name!r} in {storage}: `qsearch pareto {space.name} --plot front.png` "
                  f"plots it, `qsearch show {space.name} N` shows a trial")


@app.command()
def studies(storage: str = STORAGE,
            as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List the studies in the database."""
    from qsearch.storage import list_studies

    try:
        rows = list_studies(storage)
    except LookupError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"studies in {storage}")
    for col in ("name", "model", "trials", "states", "front", "hypervolume", "created"):
        table.add_column(col, overflow="fold")
    for r in rows:
        states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(r["states"].items()))
        hv = f"{r['hypervolume']:.4g}" if r["hypervolume"] is not None else "-"
        table.add_row(r["name"], str(r["model"]), str(r["trials"]), states, str(r["front_size"]), hv, r["created_at"])
    console.print(table)


@app.command()
def pareto(
    study: str = typer.Argument(..., help="study name"),
    storage: str = STORAGE,
    as_json: bool = typer.Option(False, "--json", help="print the front as JSON on stdout"),
    plot: Path = typer.Option(None, "--plot", help="write a PNG of quality against size"),
) -> None:
    """The Pareto front of a study (quality against size), uniform baselines marked."""
    from qsearch.storage import pareto_front, study_spec, trials as all_trials

    try:
        front = pareto_front(storage, study)
        rows = all_trials(storage, study)
        objectives = study_spec(storage, study)["json"].get("objectives", {})
    except LookupError as exc:
        fail(str(exc))
    quality, size = objectives.get("quality", "fid"), objectives.get("size", "avg_weight_bits")
    baselines = _baselines(rows)
    if plot:
        from qsearch.search.plot import plot_front

        plot_front(rows, front, plot, quality=quality, size=size, title=study)
        console.print(f"wrote {plot}")
    if as_json:
        base = [{"number": t["number"], "origin": t["origin"], "feasible": t["feasible"],
                 **{k: t["metrics"]["full"].get(k) for k in (quality, size)}} for t in baselines]
        print(json.dumps({"study": study, "objectives": [quality, size], "front": front, "baselines": base}, indent=2))
        return
    console.print(_pareto_table(study, front, baselines, quality, size))


@app.command()
def show(
    study: str = typer.Argument(..., help="study name"),
    trial: int = typer.Argument(..., help="trial number"),
    storage: str = STORAGE,
    as_json: bool = typer.Option(False, "--json", help="everything stored, as JSON"),
    recipe: bool = typer.Option(False, "--recipe", help="print only the trial's recipe (YAML)"),
) -> None:
    """One trial: configuration, metrics by fidelity, timings; --recipe gives its recipe file."""
    from qsearch.storage import trial_info

    try:
        info = trial_info(storage, study, trial)
    except LookupError as exc:
        fail(str(exc))
    if recipe:
        if info["recipe"] is None:
            fail(f"trial {trial} has no recipe (it failed before building one)")
        print(yaml.safe_dump(info["recipe"], sort_keys=False), end="")
        return
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=f"{study} trial {trial}: {info['state']} ({info['origin']}, seed {info['seed']})",
                  show_header=False)
    table.add_column(justify="right")
    table.add_column(overflow="fold")
    for name, value in (info["params"] or {}).items():
        table.add_row(name, str(value))
    for fidelity, values in info["metrics"].items():
        for name, value in values.items():
            table.add_row(f"{fidelity}.{name}", "-" if value is None else f"{value:.5g}")
    for name, seconds in info["timings"].items():
        table.add_row(name, f"{seconds:.2f}")
    if info["error"]:
        table.add_row("note", info["error"])
    console.print(table)
