"""Early termination's payoff: one search space on raccoon without and with each policy asked for.

The sweeps run the same trials (random sampling, same seed) in one run of this script, one
after the other, each as its own process started the way `visionautoml train` starts:
best mAP and total trial-seconds (Tune's ``time_total_s`` summed over trials) of each,
side by side with ratios against the sweep without early termination. Policies: ``bandit``
(the cloud service's, slack_factor 0.2) and ``asha`` (Ray's asynchronous successive halving,
reduction factor 3), both with delay_evaluation 2. Goals: best mAP within 0.01 of the baseline
with at most 50% of its compute.

It also reports the time from a sweep process's start to its first training step (the
first optimizer step in any trial, taken with torch's global optimizer hook): goal <= 15 s.
The first sweep starts in an empty workspace (MLflow schema created, data registered), the
second in the same workspace (both already there).

    .venv/bin/python benchmarks/bench_sweep.py [--trials 6] [--epochs 8] [--minutes 6]
        [--policies bandit,asha]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RACCOON = ROOT.parent / "shared" / "datasets" / "raccoon"
MACHINE = "2-core x86_64 CPU, 24 GiB, no GPU"
FIRST_STEP_FILE = "first-step.txt"


POLICIES = {
    "bandit": {"type": "bandit", "slack_factor": 0.2, "evaluation_interval": 1, "delay_evaluation": 2},
    "asha": {"type": "asha", "evaluation_interval": 1, "delay_evaluation": 2},
}


def sweep_config(args: argparse.Namespace, workspace: Path, policy: str | None) -> dict:
    """The benchmark's search space: a wide learning-rate range, from too small to learn to too large.

    A first sweep over an unknown problem looks like this; most of it is not worth finishing.
    """
    config = {
        "experiment_name": f"bench-sweep-{policy or 'baseline'}",
        "workspace": str(workspace),
        "training_data": str(RACCOON),
        "validation_data_size": 0.2,
        "limits": {"max_trials": args.trials, "max_concurrent_trials": 2},
        "sweep": {"sampling_algorithm": "random"},
        "training_parameters": {
            "model_name": "ssdlite320_mobilenet_v3_large",
            "pretrained": "none",
            "image_size": 256,
            "optimizer": "adamw",
            "number_of_epochs": args.epochs,
            "max_minutes": args.minutes,
            "evaluation_frequency": 1,
            "training_batch_size": 4,
            "validation_batch_size": 8,
            "early_stopping": False,
            "seed": 7,
        },
        "search_space": [
            {"learning_rate": {"type": "loguniform", "min_value": 0.00001, "max_value": 0.05}},
        ],
        "register": {"model_name": "bench-sweep"},
    }
    if policy:
        config["sweep"]["early_termination"] = POLICIES[policy]
    return config


def timed_run_trial(job, **kwargs):
    """``run_trial``, noting when this trial's first optimizer step happens (runs in a Ray worker)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from visionautoml.training.trial import run_trial

    marker = Path(job.workspace) / FIRST_STEP_FILE

    def note_first_step(optimizer, args, kwargs):
        if not marker.exists():
            marker.write_text(repr(time.time()))
        handle.remove()

    handle = register_optimizer_step_post_hook(note_first_step)
    return run_trial(job, **kwargs)


def child(config_path: str, out: str) -> None:
    """One sweep, as the CLI would run it, with the first-step probe around ``run_trial``."""
    from ray import cloudpickle

    from visionautoml.automl.train import settle, train
    from visionautoml.config import parse_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    result = train(settle(parse_config(json.loads(Path(config_path).read_text()))), trial_fn=timed_run_trial)
    Path(out).write_text(json.dumps(result.to_dict()))


def run_variant(args: argparse.Namespace, workspace: Path, policy: str | None) -> dict:
    config = sweep_config(args, workspace, policy)
    folder = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    (folder / "config.json").write_text(json.dumps(config))
    (workspace / FIRST_STEP_FILE).unlink(missing_ok=True)
    started = time.time()
    subprocess.run(
        [sys.executable, __file__, "--child", str(folder / "config.json"), str(folder / "result.json")],
        check=True,
        cwd=ROOT,
    )
    wall = time.time() - started
    result = json.loads((folder / "result.json").read_text())
    trials = result["trials"]
    return {
        "name": policy or "no early termination",
        "trials": len(trials),
        "stopped": sum(trial["state"] == "early_terminated" for trial in trials),
        "best_map": result["metrics"].get("mean_average_precision", float("nan")),
        "trial_seconds": sum(trial["seconds"] for trial in trials),
        "wall": wall,
        "first_step": float((workspace / FIRST_STEP_FILE).read_text()) - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=6.0, help="max_minutes of each trial")
    parser.add_argument("--policies", default="bandit,asha", help=f"comma-separated: {', '.join(POLICIES)}")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    policies = [name for name in args.policies.split(",") if name]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"--policies: unknown {', '.join(unknown)}; use {', '.join(POLICIES)}")
    if args.child:
        child(*args.child)
        return
    if not (RACCOON / "annotations").is_dir():
        sys.exit(f"the raccoon dataset is not at {RACCOON}")

    workspace = Path(tempfile.mkdtemp(prefix="bench-sweep-ws-"))
    baseline = run_variant(args, workspace, None)
    rows = [baseline] + [run_variant(args, workspace, policy) for policy in policies]

    print(f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {args}")
    header = (
        f"{'sweep':<22}{'trials':>7}{'stopped':>9}{'best mAP':>10}{'trial-s':>9}{'compute':>9}{'wall s':>8}"
    )
    print(header + f"{'first step s':>14}")
    for row in rows:
        ratio = row["trial_seconds"] / baseline["trial_seconds"]
        print(
            f"{row['name']:<22}{row['trials']:>7}{row['stopped']:>9}{row['best_map']:>10.4f}"
            f"{row['trial_seconds']:>9.0f}{ratio:>8.2f}x{row['wall']:>8.0f}{row['first_step']:>14.1f}"
        )
    verdict = {True: "met", False: "NOT met"}
    print()
    for row in rows[1:]:
        difference = row["best_map"] - baseline["best_map"]
        compute = row["trial_seconds"] / baseline["trial_seconds"]
        met = abs(difference) <= 0.01 and compute <= 0.5
        print(
            f"{row['name']}: best mAP {difference:+.4f} (goal: within 0.01), compute {compute:.0%} of the "
            f"baseline (goal <= 50%): {verdict[met]}"
        )
    used = [row["first_step"] for row in rows[1:]]
    if used:
        print(
            f"time to the first training step: {baseline['first_step']:.1f} s in a new workspace, "
            f"{', '.join(f'{value:.1f}' for value in used)} s in a used one (goal <= 15 s): "
            f"{verdict[max(used) <= 15]}"
        )
    print(f"machine: {MACHINE}")


if __name__ == "__main__":
    main()
