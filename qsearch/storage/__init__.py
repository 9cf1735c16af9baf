"""The results database: Optuna's tables plus qsearch's own (spaces, configurations, metrics, fronts).

``open_db(url)`` opens (and migrates) it; the query functions read it without Optuna.
"""

from qsearch.storage.api import (
    front_history,
    list_studies,
    pareto_front,
    study_spec,
    trial_info,
    trial_metrics,
    trial_recipe,
    trials,
)
from qsearch.storage.db import DEFAULT_URL, ResultsDB, open_db

__all__ = [
    "DEFAULT_URL", "ResultsDB", "front_history", "list_studies", "open_db", "pareto_front",
    "study_spec", "trial_info", "trial_metrics", "trial_recipe", "trials",
]
