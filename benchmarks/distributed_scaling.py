"""Scaling of a distributed study: trials per hour with 1, 2, 4, ... Ray workers, and Ray's cost per trial.

For each worker count the same number of trials of a fresh study runs through ``qsearch launch``'s
code path (``qsearch.distributed.launch``, a fresh local Ray each time). Reported per point:

* ``trials_per_hour``: trials / the study's trial span (first trial started to last trial finished,
  from the database); it includes each worker's one-off FP work in its first trial (the Session
  computes calibration trajectories and reference samples lazily), not the launch's start-up (Ray,
  worker processes importing torch, loading the model), which ``trials_per_hour_wall`` includes and
  ``startup_s`` reports;
* ``ratio`` = trials per hour / those of the first (smallest) worker count, ``efficiency`` = ratio x
  (smallest count / workers);
* a completeness check: exactly ``--trials`` finished trials, unique numbers, none RUNNING or WAITING,
  the stored Pareto front equal to Optuna's ``best_trials``;
* with GPUs, each GPU's mean utilisation over the run (``nvidia-smi -l 1`` in a background thread).

``--kill-one`` adds one more run at the largest worker count in which a worker is SIGKILLed mid-trial
once a third of the trials are done (``kill_run``: its trial must be FAILED and retried, the study
complete); the scaling points themselves run undisturbed.

Ray's overhead per trial: the same study run in this process by ``run_trials`` (no Ray, no board,
same number of trials, so the same one-off FP-reference work in the first trial) gives the span of
the trials without distribution; ``ray_overhead_per_trial_s`` = (1-worker span - in-process span) /
trials. Both spans come from the trials' start/complete times in the database.

CPU (default: a tiny U-Net built here, a few seconds of real quantize + sample work per trial on one
thread per worker):

    python benchmarks/distributed_scaling.py --workers 1 2 4 --trials 24 --out $OUT/scaling.json

Multi-GPU (issue 9: one worker per GPU; multi-fidelity and sensitivity seeding off so that every
trial does the same work; fewer samples and steps to fit the GPU budget):

    python benchmarks/distributed_scaling.py --space spaces/ddpm-cifar10.yaml --gpus-per-trial 1 \\
        --workers 1 8 --trials 16 --kill-one --in-process-trials 0 --set fidelity.enabled=false \\
        --set seed_trials.sensitivity_targets=[] --set base.eval.n_samples=500 \\
        --set base.sampler.steps=20 --out $OUT/scaling-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qsearch.cli.main import quiet_libraries  # noqa: E402
from qsearch.distributed import LaunchView, launch  # noqa: E402
from qsearch.search.space import SearchSpace, load_space, parse_space, set_path  # noqa: E402

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
             "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": True}


def tiny_unet(folder: Path) -> Path:
    """A small random UNet2DModel (32x32, 2 blocks) saved as a pipeline folder; returns the model path."""
    import diffusers
    import torch

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    model.save_pretrained(folder / "unet")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return folder / "unet"


def cpu_space(model: Path, steps: int, n_samples: int) -> dict[str, Any]:
    """Every trial: calibrate (uniform, RTN), then sample ``n_samples`` images and their MSE to FP's."""
    return {
        "name": "scaling",
        "base": {
            "model": str(model),
            "sampler": {"scheduler": "ddim", "steps": steps},
            "quant": {"w_bits": 8, "a_bits": 8},
            "calibration_pool": {"samples": 8},
            "stages": [{"method": "uniform", "n_samples": 16}, {"method": "rtn"}],
            "eval": {"n_samples": n_samples, "batch_size": n_samples, "fid": False,
                     "fidelity_samples": n_samples, "device": "cpu"},
        },
        "granularity": "block",
        "layers": {"*": {"w_bits": [3, 4, 8]}},
        "objectives": {"quality": "mse", "size": "avg_weight_bits"},
        "fidelity": {"enabled": False},
        "population_size": 8,
        "seed": 0,
        "trials": 24,
    }


def build_space(args: argparse.Namespace, workdir: Path) -> SearchSpace:
    if args.space:
        data = load_space(args.space).model_dump(mode="json", exclude_unset=True)
    else:
        data = cpu_space(tiny_unet(workdir / "tiny-unet"), args.steps, args.n_samples)
    for item in args.set:
        path, _, value = item.partition("=")
        set_path(data, path, yaml.safe_load(value))
    return parse_space(data)


class GpuSampler:
    """``nvidia-smi --query-gpu=utilization.gpu -l 1`` in a background thread; per-GPU samples."""

    def __init__(self) -> None:
        self.samples: list[float] = []  # GPU 0, 1, ..., then GPU 0 again a second later
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-l", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:  # one line per GPU per second
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def mean_per_gpu(self, n_gpus: int) -> list[float] | None:
        if not self.samples or n_gpus < 1:
            return None
        rows = [self.samples[i:i + n_gpus] for i in range(0, len(self.samples) - n_gpus + 1, n_gpus)]
        return [round(sum(r[g] for r in rows) / len(rows), 1) for g in range(n_gpus)]


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def check(url: str, name: str, n_trials: int) -> dict[str, Any]:
    """Completeness of a finished study: nothing lost, duplicated or left open; the stored front."""
    import optuna
    from optuna.trial import TrialState

    from qsearch.storage import pareto_front

    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    retried = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    best = sorted(t.number for t in study.best_trials)
    stored = sorted(p["number"] for p in pareto_front(url, name))
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return {
        "finished": len(counted), "requested": n_trials, "duplicates": len(numbers) - len(set(numbers)),
        "open": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
        "failed": len(failed), "failed_and_retried": sum(t.number in retried for t in failed),
        "front_stored_equals_best_trials": best == stored, "front_size": len(best),
        "complete": len(counted) == n_trials and len(numbers) == len(set(numbers))
        and not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials) and best == stored,
        "span_s": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
    }


def run_point(space: SearchSpace, workers: int, args: argparse.Namespace, workdir: Path,
              kill: bool = False) -> dict[str, Any]:
    """One launch of a fresh study on ``workers`` workers (``kill``: SIGKILL one mid-trial)."""
    label = f"w{workers}" + ("-kill" if kill else "")
    point = space.model_copy(update={"name": f"{space.name}-{label}"})
    url = f"sqlite:///{workdir / f'scaling-{label}.db'}" if not args.storage else args.storage
    killed: dict[str, Any] = {}

    def kill_one(view: LaunchView) -> None:
        if killed or view.status.finished < args.trials // 3:
            return
        import optuna

        trials = optuna.load_study(study_name=point.name, storage=url).get_trials()
        for w in view.workers:
            if w.get("state") == "running" and w.get("trial") is not None and w.get("pid") \
                    and trials[w["trial"]].state.name == "RUNNING":
                os.kill(w["pid"], signal.SIGKILL)
                killed.update(pid=w["pid"], trial=w["trial"], at_s=round(view.elapsed_s, 1))
                print(f"  killed worker {w['worker']} (pid {w['pid']}) in trial {w['trial']}", flush=True)
                return

    def show(view: LaunchView) -> None:
        if kill:
            kill_one(view)

    n_gpus = gpu_count() if args.gpus_per_trial else 0
    with GpuSampler() as gpu:
        result = launch(point, url, workers=workers, n_trials=args.trials, gpus_per_trial=args.gpus_per_trial,
                        cpus_per_worker=args.cpus_per_worker, heartbeat_interval=args.heartbeat,
                        grace_period=args.grace, progress=show)
    report = check(url, point.name, args.trials)
    span = report.pop("span_s")
    trial_s = [s for w in result.workers for s in (w.get("trial_seconds") or [])]
    setups = [w["setup_seconds"] for w in result.workers if w.get("setup_seconds") is not None]
    return {
        "workers": workers, "trials": args.trials, "wall_s": round(result.wall_seconds, 2),
        "span_s": round(span, 2) if span else None,
        "startup_s": round(result.wall_seconds - span, 2) if span else None,
        "worker_setup_s_max": round(max(setups), 2) if setups else None,
        "trials_per_hour": round(3600 * args.trials / span, 1) if span else None,
        "trials_per_hour_wall": round(3600 * args.trials / result.wall_seconds, 1),
        "mean_trial_s_in_worker": round(sum(trial_s) / len(trial_s), 3) if trial_s else None,
        "deaths": result.deaths, "respawns": result.respawns, "killed": killed or None,
        "gpu_utilisation_percent": gpu.mean_per_gpu(n_gpus), **report,
    }


def in_process(space: SearchSpace, n: int, workdir: Path) -> dict[str, Any]:
    """The same trials without Ray: ``run_trials`` in this process (seconds per trial, after setup)."""
    import optuna

    from qsearch.search.evaluate import SessionEvaluator, session_for
    from qsearch.search.study import open_study, run_trials

    point = space.model_copy(update={"name": f"{space.name}-inprocess"})
    url = f"sqlite:///{workdir / 'scaling-inprocess.db'}"
    started = time.perf_counter()
    evaluator = SessionEvaluator(session_for(point), point)
    setup = time.perf_counter() - started
    study = open_study(point, url)
    started = time.perf_counter()
    run_trials(point, study, n, evaluator=evaluator)
    wall = time.perf_counter() - started
    done = [t for t in optuna.load_study(study_name=point.name, storage=url).get_trials() if t.datetime_complete]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"trials": n, "setup_s": round(setup, 2), "wall_s": round(wall, 2), "span_s": round(span, 2),
            "trial_s": round(span / n, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--trials", type=int, default=24, help="trials of each study (the same for every point)")
    p.add_argument("--space", help="a search-space file (default: a tiny U-Net study built here, CPU)")
    p.add_argument("--set", action="append", default=[], help="PATH=YAML override of the space, repeatable")
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=8, help="DDIM steps of the built-in CPU study")
    p.add_argument("--n-samples", type=int, default=16, help="samples per trial of the built-in CPU study")
    p.add_argument("--in-process-trials", type=int, default=None,
                   help="trials of the no-Ray baseline (default: --trials, as the 1-worker run; 0: skip)")
    p.add_argument("--kill-one", action="store_true",
                   help="one more run at the largest worker count, SIGKILLing a worker mid-trial")
    p.add_argument("--heartbeat", type=int, default=2)
    p.add_argument("--grace", type=int, default=10)
    p.add_argument("--storage", help="one database URL for every point (e.g. postgresql://...; default: a SQLite file per point)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args()
    quiet_libraries()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(args.cpus_per_worker))))
    import torch

    torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    workdir = Path(tempfile.mkdtemp(prefix="qsearch-scaling-"))
    space = build_space(args, workdir)
    out: dict[str, Any] = {
        "host": platform.node(), "cpus": os.cpu_count(), "gpus": gpu_count(), "space": space.name,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "points": [],
    }
    for workers in args.workers:
        point = run_point(space, workers, args, workdir)
        out["points"].append(point)
        print(json.dumps(point), flush=True)
    if args.kill_one:  # a separate run, so that the scaling points are not slowed by the kill
        out["kill_run"] = run_point(space, max(args.workers), args, workdir, kill=True)
        print(json.dumps(out["kill_run"]), flush=True)
    n_in_process = args.trials if args.in_process_trials is None else args.in_process_trials
    if n_in_process:  # last: its Session stays in this process (and on its GPU)
        out["in_process"] = in_process(space, n_in_process, workdir)
        print(f"in-process: {out['in_process']}", flush=True)
    base = out["points"][0]
    for point in out["points"]:
        if point["trials_per_hour"] and base["trials_per_hour"]:
            point["ratio"] = round(point["trials_per_hour"] / base["trials_per_hour"], 3)
            point["efficiency"] = round(point["ratio"] * base["workers"] / point["workers"], 3)
    if "in_process" in out and base["workers"] == 1 and base["span_s"] and n_in_process == base["trials"]:
        out["ray_overhead_per_trial_s"] = round((base["span_s"] - out["in_process"]["span_s"]) / base["trials"], 3)
        out["ray_overhead_fraction"] = round(base["span_s"] / out["in_process"]["span_s"] - 1, 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    for point in out["points"]:
        print(f"{point['workers']} workers: {point['trials_per_hour']} trials/h (ratio {point.get('ratio')}, "
              f"efficiency {point.get('efficiency')}), complete={point['complete']}")
    print(f"ray overhead per trial: {out.get('ray_overhead_per_trial_s')} s; wrote {args.out}")


if __name__ == "__main__":
    main()
