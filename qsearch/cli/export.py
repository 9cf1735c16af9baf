"""``qsearch export`` and ``qsearch export-recipe``: write a quantized model as packed weights.

``qsearch export STUDY (--trial N | --max-bits B | --max-fid F) --out DIR`` picks a point of the
study's Pareto front, rebuilds its quantized model by re-running the trial's recipe (every stage is
seeded, so this is the model the trial measured) and writes the folder that ``qsearch.load`` reads.
``qsearch export-recipe RECIPE.yaml --out DIR`` does the same for a recipe file, without a study.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from qsearch.cli.main import RichProgress, app, console, fail, quiet_libraries
from qsearch.engine import NonFiniteError, Session
from qsearch.export.selection import choose_point, field
from qsearch.recipe import RecipeError, load_recipe, parse_recipe, read_yaml

DEFAULT_STORAGE = "sqlite:///studies.db"


def _storage_api():
    """The study database's query functions (``qsearch.storage``)."""
    try:
        from qsearch.storage import pareto_front, trial_metrics, trial_recipe
    except ImportError as exc:
        fail(f"the study database is not available in this installation ({exc})")
    return pareto_front, trial_recipe, trial_metrics


def _public_url(url: str) -> str:
    """The storage URL without its password, for the provenance record."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: keep only what precedes any credentials
        return url.split("@")[-1]


def _rebuild_and_export(recipe_data: dict[str, Any], out: Path, provenance: dict[str, Any], *,
                        device: str | None, lossy_fp16: bool, overwrite: bool,
                        evaluate: bool = False) -> dict[str, Any]:
    """Re-run the recipe, optionally measure it, write the folder; returns the bits report."""
    from qsearch.export.writer import export_model

    if device:
        recipe_data = {**recipe_data, "eval": {**recipe_data.get("eval", {}), "device": device}}
    recipe = parse_recipe(recipe_data)
    session = Session(recipe, RichProgress())
    ctx = session.quantize(recipe)
    if evaluate:
        provenance = {**provenance, "metrics": session.evaluate(ctx, recipe)}
    with RichProgress().task(f"writing {out}"):
        export_model(ctx, out, recipe=recipe_data, provenance=provenance, lossy_fp16=lossy_fp16,
                     overwrite=overwrite)
    return json.loads((out / "qsearch_config.json").read_text())["bits"]


@app.command("export")
def export(
    study: str = typer.Argument(..., help="study name"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write"),
    trial: int = typer.Option(None, "--trial", help="export this trial"),
    max_bits: float = typer.Option(None, "--max-bits", help="best FID with average weight bits <= B"),
    max_fid: float = typer.Option(None, "--max-fid", help="fewest bits with FID <= F"),
    storage: str = typer.Option(DEFAULT_STORAGE, "--storage", help="study database URL"),
    device: str = typer.Option(None, "--device", help="device to rebuild the model on"),
    fp16: bool = typer.Option(False, "--fp16", help="store full-precision parts in fp16 (lossy)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out folder"),
) -> None:
    """Export a study's trial (or its best Pareto point under a budget) as packed low-bit weights."""
    quiet_libraries()
    pareto_front, trial_recipe, trial_metrics = _storage_api()
    try:
        point = choose_point(pareto_front(storage, study), trial=trial, max_bits=max_bits, max_fid=max_fid)
        number = int(field(point, "number"))
        recipe_data = trial_recipe(storage, study, number)
        if field(point, "fid") is None:  # a trial off the front: its metrics from the database
            point = {**point, "metrics": trial_metrics(storage, study, number).get("full", {})}
    except (ValueError, KeyError, LookupError) as exc:
        fail(str(exc))
    provenance = {
        "study": study,
        "trial": number,
        "storage": _public_url(storage),
        "selection": {"trial": trial, "max_bits": max_bits, "max_fid": max_fid},
        "fid": field(point, "fid"),
        "avg_weight_bits": field(point, "bits"),
        "pareto_point": point,
    }
    try:
        bits = _rebuild_and_export(recipe_data, out, provenance, device=device, lossy_fp16=fp16,
                                   overwrite=overwrite)
    except (RecipeError, ValueError, FileExistsError, FileNotFoundError, NonFiniteError) as exc:
        fail(str(exc))
    measured = provenance["avg_weight_bits"]
    if measured is not None and abs(bits["avg_weight_bits"] - measured) > 1e-6:
        console.print(
            f"[yellow]warning:[/] the rebuilt model has {bits['avg_weight_bits']:.4g} average weight bits, "
            f"the study recorded {measured:.4g}: the trial's recipe no longer rebuilds the same model"
        )
    console.print(f"exported trial {number} of {study} to {out} ({bits['model_mb']:.2f} MB, "
                  f"{bits['avg_weight_bits']:.3g} avg weight bits)")


@app.command("export-recipe")
def export_recipe(
    recipe_file: Path = typer.Argument(..., help="recipe YAML file"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write"),
    device: str = typer.Option(None, "--device", help="device to quantize on"),
    evaluate: bool = typer.Option(False, "--evaluate", help="also measure FID/fidelity and record them"),
    fp16: bool = typer.Option(False, "--fp16", help="store full-precision parts in fp16 (lossy)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out folder"),
) -> None:
    """Quantize a model with a recipe and export it as packed low-bit weights (no study needed)."""
    quiet_libraries()
    try:
        load_recipe(recipe_file)  # validation errors with the file name
        data = read_yaml(recipe_file)
        bits = _rebuild_and_export(data, out, {"recipe_file": str(recipe_file)}, device=device,
                                   lossy_fp16=fp16, overwrite=overwrite, evaluate=evaluate)
    except (RecipeError, ValueError, FileExistsError, FileNotFoundError, NonFiniteError) as exc:
        fail(str(exc))
    console.print(f"exported {recipe_file} to {out} ({bits['model_mb']:.2f} MB, "
                  f"{bits['avg_weight_bits']:.3g} avg weight bits)")
