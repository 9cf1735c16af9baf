"""Built-in methods: one module per survey method, each registering its stages on import.

qsearch finds this package through the ``qsearch.methods`` entry-point group, the same way it finds
third-party method packages; importing it imports every module in it, so adding a method is adding
a file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
