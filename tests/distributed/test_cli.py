"""``qsearch launch`` end to end: two Ray workers, each with its own Session on a tiny U-Net."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from qsearch.cli import app

pytestmark = pytest.mark.usefixtures("ray_local")


def test_launch_runs_a_real_study_on_two_workers(tiny_model_dir, tmp_path):
    space = {
        "name": "launch",
        "base": {
            "model": str(tiny_model_dir("unet2d")),
            "sampler": {"scheduler": "ddim", "steps": 2},
            "quant": {"w_bits": 8, "a_bits": 8},
            "calibration_pool": {"samples": 2},
            "stages": [{"method": "uniform", "n_samples": 2}, {"method": "rtn"}],
            "eval": {"n_samples": 2, "batch_size": 2, "fid": False, "fidelity_samples": 2, "device": "cpu"},
        },
        "granularity": "pattern",
        "layers": {"*": {"w_bits": [2, 8]}},
        "objectives": {"quality": "mse"},
        "fidelity": {"enabled": False},
        "trials": 4,
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    result = CliRunner().invoke(app, ["launch", str(path), "--workers", "2", "--storage", url,
                                      "--heartbeat", "1", "--grace", "3"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="launch", storage=url)
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    baselines = sorted(t.values[1] for t in study.trials if t.user_attrs["qsearch:origin"].startswith("uniform"))
    assert baselines[0] < baselines[1]  # uniform W2 and W8 were measured by real sessions
    assert all(t.values[0] >= 0 for t in study.trials)
