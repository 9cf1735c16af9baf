"""``qsearch methods`` and ``qsearch schema``: what can go into a recipe."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from qsearch.cli.main import app, console
from qsearch.registry import REGISTRY
from qsearch.stages import KIND_ORDER


def method_rows() -> list[dict[str, object]]:
    """One row per registered stage: name, kind, summary, paper, tunable parameters."""
    rows = []
    for name in REGISTRY.names():
        cls = REGISTRY.get(name)
        params = {k: str(f.annotation) for k, f in cls.Config.model_fields.items() if k != "method"}
        rows.append({"name": name, "kind": cls.kind, "summary": cls.summary(), "paper": cls.paper,
                     "params": sorted(params)})
    rows.sort(key=lambda r: (KIND_ORDER.index(r["kind"]), r["name"]))
    return rows


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List every registered stage with its kind, summary and paper."""
    rows = method_rows()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="qsearch methods")
    for col in ("name", "kind", "summary", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["summary"], r["paper"])
    console.print(table)


@app.command()
def schema(kind: str = typer.Argument("recipe", help="recipe or space")) -> None:
    """Print the JSON Schema of recipe (or search-space) files."""
    if kind == "recipe":
        from qsearch.recipe import recipe_schema

        print(json.dumps(recipe_schema(), indent=2))
    elif kind == "space":
        from qsearch.search.space import space_schema

        print(json.dumps(space_schema(), indent=2))
    else:
        raise typer.BadParameter("recipe or space", param_hint="KIND")
