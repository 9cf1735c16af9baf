"""Registry: names are unique, unknown names suggest close ones, entry points are discovered."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from qsearch import registry as registry_mod
from qsearch.registry import REGISTRY, Registry, RegistryError
from qsearch.stages import Quantizer, StageConfig


def _stage_class() -> type[Quantizer]:
    class Dummy(Quantizer):
        """A stage for tests."""

        class Config(StageConfig):
            pass

        def apply(self, ctx) -> None:
            pass

    return Dummy


def test_register_adds_method_literal_and_name() -> None:
    reg = Registry()
    reg._loaded = True
    cls = reg.register("dummy")(_stage_class())
    assert reg.get("dummy") is cls and cls.name == "dummy"
    assert cls.Config(method="dummy").method == "dummy"
    with pytest.raises(Exception):
        cls.Config(method="other")


def test_duplicate_name_rejected() -> None:
    reg = Registry()
    reg._loaded = True
    reg.register("dummy")(_stage_class())
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("dummy")(_stage_class())


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(RegistryError, match="did you mean: mse_clip"):
        REGISTRY.get("mse_clp")


def test_builtin_methods_of_every_kind_registered() -> None:
    kinds = {REGISTRY.get(n).kind for n in REGISTRY.names()}
    assert {"calibration", "quantize"} <= kinds
    assert {"uniform", "rtn", "mse_clip"} <= set(REGISTRY.names())


def test_entry_point_plugins_are_loaded(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    plugin = tmp_path / "qsearch_test_plugin.py"
    plugin.write_text(
        "from qsearch.registry import register\n"
        "from qsearch.stages import Quantizer, StageConfig\n"
        "@register('plugin_quantizer')\n"
        "class P(Quantizer):\n"
        "    '''A third-party quantizer.'''\n"
        "    class Config(StageConfig):\n"
        "        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        EntryPoint("builtin", "methods", registry_mod.ENTRY_POINT_GROUP),
        EntryPoint("plugin", "qsearch_test_plugin", registry_mod.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: eps)
    reg = Registry()
    monkeypatch.setattr(registry_mod, "REGISTRY", reg)
    monkeypatch.setattr(registry_mod, "register", reg.register)
    reg.load_plugins()
    assert "plugin_quantizer" in reg._stages


def test_installed_package_declares_builtin_entry_point() -> None:
    from importlib.metadata import entry_points

    values = {ep.value for ep in entry_points(group=registry_mod.ENTRY_POINT_GROUP)}
    assert "methods" in values
