"""The method registry: every survey method is a named stage of one of four kinds.

Stages register with a decorator, the way ``timm`` registers model constructors, so that a recipe
file can name a method as a string and a third-party package can add methods without touching this
one (through the ``qsearch.methods`` entry-point group; the built-in ``methods`` package is itself
discovered that way, and imported directly as a fallback when qsearch runs from a source tree).
"""

from __future__ import annotations

import difflib
import importlib
import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import create_model

if TYPE_CHECKING:
    from qsearch.stages import Stage, StageConfig

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qsearch.methods"

S = TypeVar("S", bound="type[Stage]")


class RegistryError(KeyError):
    """A stage name that is unknown or registered twice."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """Maps a stage name to its class; each class knows its kind and config model."""

    def __init__(self) -> None:
        self._stages: dict[str, type[Stage]] = {}
        self._loaded = False

    def register(self, name: str) -> "callable":
        """Class decorator: ``@register("rtn")`` on a ``Stage`` subclass with a ``Config``.

        The registered config gets a ``method: Literal[name]`` field, which makes a list of
        heterogeneous stages a discriminated union that pydantic validates with exact paths.
        """

        def decorate(cls: S) -> S:
            if name in self._stages and self._stages[name] is not cls:
                other = self._stages[name]
                raise RegistryError(
                    f"stage name {name!r} is already registered by "
                    f"{other.__module__}.{other.__qualname__}"
                )
            base = cls.Config
            cls.Config = create_model(  # type: ignore[assignment]
                f"{cls.__name__}Config",
                __base__=base,
                __doc__=base.__doc__ or cls.__doc__,
                method=(Literal[name], ...),  # type: ignore[valid-type]
            )
            cls.name = name
            self._stages[name] = cls
            return cls

        return decorate

    def unregister(self, name: str) -> None:
        """Remove a stage (tests and plugin reloads)."""
        self._stages.pop(name, None)

    def load_plugins(self) -> None:
        """Import every module named in the ``qsearch.methods`` entry-point group, once."""
        if self._loaded:
            return
        self._loaded = True
        found = False
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found = found or ep.value.split(":")[0] == "methods"
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not hide the built-in methods
                logger.warning("could not load qsearch plugin %s (%s): %s", ep.name, ep.value, exc)
        if not found:
            importlib.import_module("methods")

    def get(self, name: str) -> type[Stage]:
        """The stage class for ``name``; an unknown name lists the closest registered ones."""
        self.load_plugins()
        try:
            return self._stages[name]
        except KeyError:
            raise RegistryError(unknown_name_message("method", name, self._stages)) from None

    def names(self, kind: str | None = None) -> list[str]:
        """Registered names, optionally of one kind, sorted."""
        self.load_plugins()
        return sorted(n for n, c in self._stages.items() if kind is None or c.kind == kind)

    def configs(self) -> list[type[StageConfig]]:
        """Config models of every registered stage (the union that recipes validate against)."""
        self.load_plugins()
        return [self._stages[n].Config for n in sorted(self._stages)]


def unknown_name_message(what: str, name: str, known: "dict | list") -> str:
    """``unknown method 'adarond'; did you mean: adaround?`` and the full list when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}?" if close else f"known: {', '.join(sorted(known))}"
    return f"unknown {what} {name!r}; {hint}"


REGISTRY = Registry()
register = REGISTRY.register
