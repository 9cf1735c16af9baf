"""``benchmarks/search_study.py``: a resumed study times only the trials of this run."""

from __future__ import annotations

import json

import yaml

from benchmarks.search_study import main
from tests.cli.test_search_cli import _space


def test_resumed_run_counts_only_its_own_trials(tiny_model_dir, tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(_space(tiny_model_dir("unet2d"), seed_trials={"uniform": False})))
    out = tmp_path / "run"
    args = ["--space", str(space), "--out", str(out), "--no-fp", "--audit", "0"]
    main([*args, "--trials", "2"])
    first = json.loads((out / "summary.json").read_text())
    assert first["trials"]["finished"] == 2 and first["trials_this_run"] == 2
    main([*args, "--trials", "3"])  # the same study, resumed to 3 trials
    second = json.loads((out / "summary.json").read_text())
    assert second["trials"]["finished"] == 3 and second["trials_this_run"] == 1
    assert second["trials_per_hour"] == 1 / second["seconds"]["study"] * 3600
