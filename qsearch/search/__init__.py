"""Mixed-precision search: search-space files, the Optuna study driver, multi-fidelity evaluation."""

from qsearch.search.space import SearchSpace, load_space, parse_space, space_schema
from qsearch.search.study import StudyStatus, open_study, run_trials, study_status

__all__ = ["SearchSpace", "StudyStatus", "load_space", "open_study", "parse_space", "run_trials",
           "space_schema", "study_status"]
