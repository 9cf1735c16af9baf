"""Tests of qsearch.metrics (a package, so its conftest does not shadow tests/conftest.py as ``conftest``)."""
