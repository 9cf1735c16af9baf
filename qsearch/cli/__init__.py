"""The ``qsearch`` command line: one typer app, one module per group of commands.

``main.py`` holds the shared app and console; each command module registers its commands on it.
"""

from qsearch.cli.main import app  # noqa: F401
from qsearch.cli import methods, quantize  # noqa: F401,E402  (register their commands)

for _optional in ("search", "launch", "export"):
    try:
        __import__(f"qsearch.cli.{_optional}")
    except ModuleNotFoundError as _exc:  # a command group not built yet in this checkout
        if _exc.name != f"qsearch.cli.{_optional}":
            raise
