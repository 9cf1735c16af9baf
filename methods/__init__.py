"""Built-in methods: one module per survey method, each registering its stages on import.

qsearch finds this package through the ``qsearch.methods`` entry-point group, the same way it finds
third-party method packages.
"""

from methods import clipping, rtn, uniform  # noqa: F401
