"""The shared typer app, console and rich progress of the CLI."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qsearch.engine import Progress as EngineProgress

app = typer.Typer(
    help="Quantize diffusion models with composable survey methods; search mixed precision.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


def quiet_libraries() -> None:
    """Silence the loading chatter of diffusers/transformers so progress bars stay readable."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


class RichProgress(EngineProgress):
    """Engine progress shown as rich progress bars on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda n: None
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            task_id = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task_id, n)
        console.log(f"[green]done[/] {description}")


def fail(message: str, code: int = 2) -> None:
    """Print an error and exit with ``code`` (no traceback for user errors)."""
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)
