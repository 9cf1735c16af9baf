"""The query API reads what a study wrote, and names what is missing."""

from __future__ import annotations

import pytest

from qsearch.storage import list_studies, open_db, pareto_front, trial_info, trial_metrics, trial_recipe


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    db = open_db(url)
    db.record_study("s", 1, "name: s", {"name": "s", "base": {"model": "m"}, "objectives": {"quality": "fid"}})
    for n, (fid, bits) in enumerate([(10.0, 4.0), (20.0, 3.0), (30.0, 4.5)]):
        db.record_trial("s", n, state="COMPLETE", origin="sampler", seed=n, params={"w_bits:a": int(bits)},
                        recipe={"model": "m", "quant": {"w_bits": int(bits)}},
                        metrics={"proxy": {"mse": fid / 100}, "full": {"fid": fid, "avg_weight_bits": bits}},
                        timings={"full_seconds": 1.5})
    db.record_trial("s", 3, state="PRUNED", error="proxy-dominated by trial 0", metrics={"proxy": {"mse": 0.5}})
    db.record_front("s", [(0, 10.0, 4.0), (1, 20.0, 3.0)], n_complete=3, hypervolume=7.0,
                    reference=(33.0, 4.95), quality_metric="fid", size_metric="avg_weight_bits")
    return url


def test_queries(url):
    front = pareto_front(url, "s")
    assert [(r["number"], r["fid"], r["avg_weight_bits"]) for r in front] == [(1, 20.0, 3.0), (0, 10.0, 4.0)]
    assert front[0]["metrics"] == {"fid": 20.0, "avg_weight_bits": 3.0}
    assert trial_recipe(url, "s", 2) == {"model": "m", "quant": {"w_bits": 4}}
    assert trial_metrics(url, "s", 3) == {"proxy": {"mse": 0.5}}
    info = trial_info(url, "s", 0)
    assert info["timings"] == {"full_seconds": 1.5} and info["seed"] == 0
    (row,) = list_studies(url)
    assert row["states"] == {"COMPLETE": 3, "PRUNED": 1} and row["front_size"] == 2 and row["hypervolume"] == 7.0


def test_missing_things_raise_lookup_errors(url, tmp_path):
    with pytest.raises(LookupError, match="no study 'nope'.*studies: s"):
        pareto_front(url, "nope")
    with pytest.raises(LookupError, match="has no trial 9"):
        trial_recipe(url, "s", 9)
    with pytest.raises(LookupError, match="has no recipe"):
        trial_recipe(url, "s", 3)
    missing = tmp_path / "absent.db"
    with pytest.raises(LookupError, match="no study database"):
        list_studies(f"sqlite:///{missing}")
    assert not missing.exists()  # a read never creates an empty database
