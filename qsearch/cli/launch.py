"""``qsearch launch``: one study run by several Ray workers (a local Ray, or a cluster with --address).

The same study as ``qsearch search`` (same space file, same database, resumable), with the trials
spread over workers: ``--workers 4 --gpus-per-trial 1`` on a 4-GPU host, ``--gpus-per-trial 0.5`` for
two workers per GPU. For workers on several hosts, give a PostgreSQL ``--storage`` URL: SQLite's file
locking is unsafe on network file systems.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.live import Live

from qsearch.cli.main import app, console, fail, quiet_libraries
from qsearch.recipe import RecipeError
from qsearch.storage.db import DEFAULT_URL


@app.command()
def launch(
    space_file: Path = typer.Argument(..., help="search-space YAML file"),
    workers: int = typer.Option(..., "--workers", "-w", min=1, help="Ray workers (each runs one trial at a time)"),
    gpus_per_trial: float = typer.Option(0.0, "--gpus-per-trial", min=0, help="GPUs per worker (0.5: two per GPU)"),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", min=0.1, help="CPUs (torch threads) per worker"),
    address: str = typer.Option(None, "--address", help="join a Ray cluster ('auto' or host:port); default: local Ray"),
    trials: int = typer.Option(None, "--trials", "-n", help="finished trials to reach (default: the space's)"),
    storage: str = typer.Option(DEFAULT_URL, "--storage", help="SQLAlchemy URL (postgresql://... for several hosts)"),
    device: str = typer.Option(None, "--device", help="override base.eval.device"),
    heartbeat: int = typer.Option(30, "--heartbeat", min=1, help="seconds between a running trial's heartbeats"),
    grace: int = typer.Option(120, "--grace", min=1, help="seconds without a heartbeat before a trial is retried"),
) -> None:
    """Run (or resume) a study on several Ray workers; a worker that dies is replaced, its trial retried."""
    quiet_libraries()
    from qsearch.distributed import launch as run_launch
    from qsearch.distributed.progress import render
    from qsearch.search.space import load_space

    try:
        space = load_space(space_file)
    except RecipeError as exc:
        fail(str(exc))
    if device:
        space.base.setdefault("eval", {})["device"] = device
    if grace <= heartbeat:
        fail("--grace must be longer than --heartbeat")
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        with Live(console=console, refresh_per_second=2) as live:
            result = run_launch(space, storage, workers=workers, n_trials=trials, gpus_per_trial=gpus_per_trial,
                                cpus_per_worker=cpus_per_worker, address=address, heartbeat_interval=heartbeat,
                                grace_period=grace, progress=lambda view: live.update(render(view)))
    except KeyboardInterrupt:
        console.print("[yellow]killed:[/] finished trials are kept; the killed trials are retried when you "
                      "run the same command again")
        raise typer.Exit(130)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    status = result.status
    if result.stopped:
        console.print(f"[yellow]stopped:[/] {status.finished} of {status.n_trials} trials finished and kept; "
                      f"run the same command to continue")
        raise typer.Exit(130)
    if not result.complete:
        fail(f"{status.finished} of {status.n_trials} trials finished: too many workers died "
             f"({result.deaths}); run the same command to continue", code=1)
    console.print(f"study {space.name!r}: {status.finished} trials on {workers} workers in "
                  f"{result.wall_seconds:.0f} s ({result.deaths} workers died and were replaced); "
                  f"`qsearch pareto {space.name} --storage {storage}` shows the front")
