"""``qsearch search/studies/pareto/show`` end to end on a tiny U-Net, and Ctrl-C during a trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from qsearch.cli import app
from qsearch.recipe import parse_recipe


def _space(model_dir: Path, **changes) -> dict:
    space = {
        "name": "cli",
        "base": {
            "model": str(model_dir),
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
        "trials": 5,
    }
    space.update(changes)
    return space


def test_search_then_read_the_results(tiny_model_dir, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(_space(tiny_model_dir("unet2d"))))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    runner = CliRunner()

    result = runner.invoke(app, ["search", str(path), "--trials", "2", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "Pareto front of cli" in result.output and "uniform-w2" in result.output
    result = runner.invoke(app, ["search", str(path), "--trials", "3", "--storage", url])
    assert result.exit_code == 0 and "resuming study 'cli': 2 finished trials" in result.output

    result = runner.invoke(app, ["studies", "--storage", url, "--json"])
    (row,) = json.loads(result.stdout)
    assert row["name"] == "cli" and row["states"] == {"COMPLETE": 3} and row["front_size"] >= 1

    png = tmp_path / "front.png"
    result = runner.invoke(app, ["pareto", "cli", "--storage", url, "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["objectives"] == ["mse", "avg_weight_bits"]
    assert {b["origin"] for b in out["baselines"]} == {"uniform-w2", "uniform-w8"}
    best = optuna.load_study(study_name="cli", storage=url).best_trials
    assert sorted(p["number"] for p in out["front"]) == sorted(t.number for t in best)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    number = out["front"][0]["number"]
    result = runner.invoke(app, ["show", "cli", str(number), "--storage", url, "--recipe"])
    assert result.exit_code == 0
    recipe = parse_recipe(yaml.safe_load(result.stdout))
    result = runner.invoke(app, ["show", "cli", str(number), "--storage", url, "--json"])
    info = json.loads(result.stdout)
    assert info["state"] == "COMPLETE" and info["metrics"]["full"]["mse"] == out["front"][0]["mse"]
    bits = {spec["w_bits"] for spec in info["layers"].values()}
    assert bits == {recipe.layer_plan().spec_for(name).w_bits for name in info["layers"]}

    result = runner.invoke(app, ["show", "cli", "7", "--storage", url])
    assert result.exit_code == 2 and "no trial 7" in result.output
    result = runner.invoke(app, ["pareto", "nope", "--storage", url])
    assert result.exit_code == 2 and "no study 'nope'" in result.output


def _wait_for_running(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> int:
    """The number of the first trial seen RUNNING in the database (the study is polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            study = optuna.load_study(study_name="cli", storage=url)
            running = [t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
            if running:
                return running[0]
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"no trial started running (exit code {proc.poll()})")


def test_ctrl_c_fails_the_running_trial_and_a_rerun_continues(tiny_model_dir, tmp_path):
    # enough samples per trial that the trial is still running when the signal arrives
    space = _space(tiny_model_dir("unet2d"), trials=3)
    space["base"]["eval"].update(n_samples=48, batch_size=8, fidelity_samples=48)
    space["base"]["sampler"]["steps"] = 16  # a trial of seconds: the 0.5 s below stays inside it
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    cmd = [
        sys.executable, "-c", "from qsearch.cli import app; app()", "search", str(path), "--storage", url]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted = _wait_for_running(url, proc)
    time.sleep(0.5)  # inside the trial's sampling loop
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "interrupted" in output and "run the same command to continue" in output

    study = optuna.load_study(study_name="cli", storage=url)
    states = {t.number: t.state for t in study.trials}
    assert TrialState.RUNNING not in states.values()
    assert states[interrupted] == TrialState.FAIL
    assert study.trials[interrupted].user_attrs["qsearch:error"] == "interrupted"
    finished_before = {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}

    rerun = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout
    study = optuna.load_study(study_name="cli", storage=url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3  # the requested total, no more
    assert all(study.trials[n].values == v for n, v in finished_before.items())  # nothing lost or redone
    retry = [t for t in complete if t.user_attrs.get("qsearch:retry_of") == interrupted]
    assert len(retry) == 1 and retry[0].params == study.trials[interrupted].params
    rows = json.loads(CliRunner().invoke(app, ["studies", "--storage", url, "--json"]).stdout)
    assert rows[0]["states"] == {"COMPLETE": 3, "FAIL": 1}
