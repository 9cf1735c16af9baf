"""``qsearch quantize RECIPE``: apply a recipe, evaluate it, print the figures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from qsearch.cli.main import RichProgress, app, console, fail, quiet_libraries
from qsearch.engine import NonFiniteError, Session
from qsearch.recipe import RecipeError, load_recipe


@app.command()
def quantize(
    recipe_file: Path = typer.Argument(..., help="recipe YAML file"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on stdout"),
    n_samples: int = typer.Option(None, "--n-samples", "-n", help="override eval.n_samples"),
    device: str = typer.Option(None, "--device", help="override eval.device"),
    with_fp: bool = typer.Option(False, "--with-fp", help="also evaluate the FP model"),
) -> None:
    """Apply a recipe to its model, then print FID, fidelity, average bits, model MB and time."""
    quiet_libraries()
    try:
        recipe = load_recipe(recipe_file)
    except RecipeError as exc:
        fail(str(exc))
    if n_samples:
        recipe.eval.n_samples = n_samples
    if device:
        recipe.eval.device = device
    started = time.perf_counter()
    try:
        session = Session(recipe, RichProgress(enabled=not as_json))
        result = session.run(recipe)
        fp_metrics = session.evaluate(None, recipe) if with_fp else None
    except NonFiniteError as exc:
        fail(f"the quantized model diverged: {exc}", code=3)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    out = {"recipe": str(recipe_file), **result.as_dict(), "seconds": time.perf_counter() - started}
    if fp_metrics is not None:
        out["fp_metrics"] = fp_metrics
    if as_json:
        print(json.dumps(out, indent=2))
        return
    table = Table(title=f"{recipe.name or recipe_file}")
    table.add_column("metric")
    table.add_column("quantized", justify="right")
    if fp_metrics is not None:
        table.add_column("FP", justify="right")
    for key, value in result.metrics.items():
        row = [key, f"{value:.4g}"]
        if fp_metrics is not None:
            row.append(f"{fp_metrics.get(key, float('nan')):.4g}")
        table.add_row(*row)
    table.add_row("calibrate_seconds", f"{result.timings['calibrate_seconds']:.1f}")
    console.print(table)
