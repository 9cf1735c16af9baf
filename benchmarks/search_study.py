"""Run a search study (default: spaces/ddpm-cifar10.yaml) and write its plot and a JSON summary.

The summary has the Pareto front, the uniform baselines (fully evaluated trials of the same study,
so measured exactly like the front) with whether the front dominates each, the FP model's FID at the
same sample count, the number of full evaluations the multi-fidelity scheme saved, trials per hour,
the hypervolume after each trial and, with ``--audit K``, K proxy-pruned trials evaluated in full
afterwards to count wrong prunes (a pruned trial that would have entered the front).

CPU check at tiny scale (minutes on a shared 2-core machine, not a meaningful front):

    python benchmarks/search_study.py --out /tmp/search --device cpu --trials 3 --steps 2 \\
        --n-samples 8 --proxy-samples 4 --batch-size 8 --autocast none \\
        --set base.calibration_pool.samples=2 --set base.stages.0.n_samples=4 \\
        --set seed_trials.sensitivity_samples=2 --set seed_trials.sensitivity_targets=[3] --audit 1 \\
        --set 'base.stages.1={method: rtn}'

(``rtn`` instead of the space's ``mse_clip`` on CPU only: the MSE range search over 113 layers and
20 candidate ranges costs minutes of CPU per trial; on the GPU it is seconds.)

H100 plan for BENCHMARKS.md (about 8 minutes; each trial quantizes with ``mse_clip`` (~1-3 s), scores
the 256-sample DDIM-50 MSE proxy (~1 s), and trials that can still enter the front get FID-res9 on
``--n-samples`` samples (1,000: ~4 s with bf16 autocast)):

    python benchmarks/search_study.py --out runs/search --variant fp16 --n-samples 1000 --audit 2 \\
        --max-minutes 7.5
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from qsearch.cli.main import quiet_libraries
from qsearch.recipe import parse_recipe
from qsearch.search.evaluate import SessionEvaluator, session_for
from qsearch.search.pareto import dominates
from qsearch.search.plot import plot_front
from qsearch.search.space import load_space, parse_space, set_path
from qsearch.search.study import open_study, run_trials, study_status
from qsearch.storage import front_history, pareto_front, trial_recipe, trials


def overridden_space(args: argparse.Namespace):
    """The space with the command line's overrides of the base recipe and the study settings."""
    space = load_space(args.space)
    data = space.model_dump(mode="json", exclude_unset=True)
    base = data["base"]
    ev = base.setdefault("eval", {})
    for key, value in (("n_samples", args.n_samples), ("batch_size", args.batch_size), ("device", args.device),
                       ("autocast", args.autocast)):
        if value is not None:
            ev[key] = value
    if args.variant:
        base["variant"] = args.variant
    if args.steps:
        base.setdefault("sampler", {})["steps"] = args.steps
    for item in args.set:
        path, _, value = item.partition("=")
        set_path(data, path, yaml.safe_load(value))
    if args.proxy_samples:
        data.setdefault("fidelity", {})["proxy_samples"] = args.proxy_samples
    if args.no_sensitivity:
        data.setdefault("seed_trials", {})["sensitivity_targets"] = []
    if args.trials:
        data["trials"] = args.trials
    return parse_space(data, str(args.space), Path(args.space).read_text())


def baseline_report(rows: list[dict[str, Any]], front: list[dict[str, Any]], q: str, s: str) -> list[dict[str, Any]]:
    """Each uniform configuration against the front: dominated, or on the front itself."""
    out = []
    for t in rows:
        if not (t["origin"] or "").startswith("uniform-") or t["state"] != "COMPLETE":
            continue
        full = t["metrics"]["full"]
        point = (full[q], full[s])
        better = [p for p in front if dominates((p["quality"], p["size"]), point)]
        at_most = [p for p in front if p["size"] <= full[s]]
        out.append({
            "trial": t["number"], "origin": t["origin"], q: full[q], s: full[s], "within_budget": t["feasible"],
            "dominated_by_front": bool(better),
            "on_front": any(p["number"] == t["number"] for p in front),
            "best_front_at_or_below_size": min(at_most, key=lambda p: p["quality"]) if at_most else None,
        })
    return out


def goals(front: list[dict[str, Any]], fp: float | None) -> dict[str, Any]:
    """Best front FID at <= 4 and <= 3 average weight bits, and its distance to FP."""
    out: dict[str, Any] = {}
    for bits in (4, 3):
        fits = [p for p in front if p["size"] <= bits]
        best = min(fits, key=lambda p: p["quality"]) if fits else None
        out[f"best_at_{bits}_bits"] = best and {"trial": best["number"], "quality": best["quality"], "size": best["size"],
                                                 "minus_fp": None if fp is None else best["quality"] - fp}
    return out


def audit(space, storage: str, rows: list[dict[str, Any]], front: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """Evaluate ``k`` proxy-pruned trials in full: would any have entered the front?"""
    pruned = [t for t in rows if t["state"] == "PRUNED" and (t["error"] or "").startswith("proxy-dominated")]
    chosen = random.Random(0).sample(pruned, min(k, len(pruned)))
    evaluator = SessionEvaluator(session_for(space), space)
    q, s = space.objectives.quality, space.objectives.size
    results = []
    for t in chosen:
        recipe = parse_recipe(trial_recipe(storage, space.name, t["number"]))
        full = evaluator.full(evaluator.quantize(recipe, t["seed"]), recipe)
        point = (full[q], full[s])
        enters = not any(dominates((p["quality"], p["size"]), point) or (p["quality"], p["size"]) == point for p in front)
        results.append({"trial": t["number"], q: full[q], s: full[s], "proxy": t["metrics"].get("proxy", {}),
                        "would_enter_front": enters})
    return {"audited": len(results), "wrong_prunes": sum(r["would_enter_front"] for r in results), "trials": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=Path("spaces/ddpm-cifar10.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="output folder (plot, summary, studies.db)")
    parser.add_argument("--storage", help="database URL (default: sqlite:///OUT/studies.db)")
    parser.add_argument("--trials", type=int, help="override the space's trial count")
    parser.add_argument("--max-minutes", type=float, help="stop starting trials after this much wall time")
    parser.add_argument("--n-samples", type=int, help="override base eval.n_samples (the full FID)")
    parser.add_argument("--proxy-samples", type=int, help="override fidelity.proxy_samples")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, help="override sampler.steps")
    parser.add_argument("--device")
    parser.add_argument("--variant", help="weights variant (fp16 on the GPU machine)")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"])
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a space field, e.g. base.stages.0.n_samples=64")
    parser.add_argument("--no-sensitivity", action="store_true", help="no sensitivity-seeded trials")
    parser.add_argument("--no-fp", action="store_true", help="skip the FP model's FID")
    parser.add_argument("--audit", type=int, default=3, help="proxy-pruned trials to evaluate in full afterwards")
    args = parser.parse_args(argv)
    quiet_libraries()

    space = overridden_space(args)
    args.out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(args.out / 'studies.db').resolve()}"
    started = time.perf_counter()
    session = session_for(space)
    load_seconds = time.perf_counter() - started
    recipe = space.recipe()
    fp_metrics = None
    if not args.no_fp:
        fp_recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"fid": True})})
        fp_metrics = session.evaluate(None, fp_recipe)
        print(f"FP: {fp_metrics.get(space.objectives.quality)}", file=sys.stderr, flush=True)

    study = open_study(space, storage)
    finished_before = study_status(study, space.trials).finished  # a resumed study's earlier trials
    study_started = time.perf_counter()
    deadline = None if args.max_minutes is None else started + 60 * args.max_minutes

    def report(status) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {status.last}: finished {status.finished}/{status.n_trials}, "
              f"complete {status.complete}, pruned {status.pruned_proxy}+{status.pruned_infeasible}, "
              f"failed {status.failed}, front {len(status.front)}", file=sys.stderr, flush=True)

    run_trials(space, study, space.trials, session=session, progress=report,
               stop=lambda: deadline is not None and time.perf_counter() > deadline)
    study_seconds = time.perf_counter() - study_started
    status = study_status(study, space.trials)

    q, s = space.objectives.quality, space.objectives.size
    rows = trials(storage, space.name)
    front = pareto_front(storage, space.name)
    fp_quality = fp_metrics.get(q) if fp_metrics else None
    plot_front(rows, front, args.out / "front.png", quality=q, size=s, title=space.name, fp_quality=fp_quality)
    audit_result = audit(space, storage, rows, front, args.audit) if args.audit else None
    timings = [t for t in rows if t["state"] in ("COMPLETE", "PRUNED")]
    summary = {
        "space": str(args.space),
        "study": space.name,
        "storage": storage,
        "device": str(session.device),
        "overrides": {k: v for k, v in vars(args).items() if k not in ("space", "out", "storage") and v not in (None, [], False)},
        "objectives": [q, s],
        "fp": fp_metrics,
        "front": front,
        "uniform_baselines": baseline_report(rows, front, q, s),
        "goals": goals(front, fp_quality),
        "trials": {"target": space.trials, "finished": status.finished, "complete": status.complete,
                   "pruned_by_proxy": status.pruned_proxy, "pruned_over_budget": status.pruned_infeasible,
                   "failed": status.failed},
        "full_evaluations": status.complete,
        "full_evaluations_saved": status.full_evaluations_saved,
        "seconds": {"model_load": load_seconds, "study": study_seconds, "total": time.perf_counter() - started},
        "trials_this_run": status.finished - finished_before,
        # this process's trials over this process's time: a resumed study's earlier runs are not timed here
        "trials_per_hour": (status.finished - finished_before) / study_seconds * 3600 if study_seconds else None,
        "measured_trials": len(timings),
        "hypervolume": front_history(storage, space.name),
        "audit": audit_result,
        "failures": [{"trial": t["number"], "error": t["error"]} for t in rows if t["state"] == "FAIL"],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: summary[k] for k in ("trials", "full_evaluations_saved", "trials_per_hour", "goals")},
                     indent=2, default=str))
    print(f"wrote {args.out / 'front.png'} and {args.out / 'summary.json'}", file=sys.stderr)
    return 0 if status.complete else 1


if __name__ == "__main__":
    sys.exit(main())
