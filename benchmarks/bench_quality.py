"""Quality against the detector a user would otherwise pick: our sweeps beside Ultralytics YOLOv8n.

In one run of this script, one after the other on the same machine, the same split (annotation
files sorted by name, every 5th to validation, as the original CI flow and the peer script do)
and the same wall-clock budget, all from scratch:

1. the peer: ``../shared/benchmarks/peer_ultralytics.py`` in its own virtual environment
   (Ultralytics is AGPL: a benchmark peer only, never imported here);
2. our sweep: ``visionautoml train CONFIG`` (default examples/raccoon-yolox.yaml: yolox_nano,
   yolox_tiny and ssdlite side by side) with ``limits.timeout_minutes`` set to the budget;
3. the automatic mode: the same data and ``limits`` and nothing else.

It prints mAP@0.5 and mAP@[.5:.95] of each with the ratio against the peer, and the ONNX Runtime
milliseconds per image of the sweep's trained models (yolox_nano, yolox_tiny and ssdlite, exported
with the parity check, timed on the validation images with the model's own pre- and post-processing
in the graph). Goal: best of sweep mAP@0.5 >= 1.13x the peer (0.85 on raccoon), the automatic mode >= 1.0x.

    .venv/bin/python benchmarks/bench_quality.py [--minutes 20] [--data ../shared/datasets/raccoon]
        [--peer-python ~/.venvs/peer/bin/python] [--peer-threads N] [--skip-peer] [--skip-sweep]
        [--skip-automatic]
        [--output-json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RACCOON = ROOT.parent / "shared" / "datasets" / "raccoon"
PEER_SCRIPT = ROOT.parent / "shared" / "benchmarks" / "peer_ultralytics.py"
MACHINE = "2-core x86_64 CPU, 24 GiB, no GPU"
VISIONAUTOML = Path(sys.executable).parent / "visionautoml"


PEER_WITH_THREADS = """
import runpy, sys
import ultralytics.utils.torch_utils as torch_utils
torch_utils.NUM_THREADS = int(sys.argv.pop(1))
sys.argv[0] = sys.argv[1]
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""
"""Runs the peer script with Ultralytics' CPU thread count replaced (it trains on ``cpu_count - 1``)."""


def run_peer(args: argparse.Namespace, work: Path) -> dict:
    started = time.time()
    wrapper = ["-c", PEER_WITH_THREADS, str(args.peer_threads)] if args.peer_threads else []
    done = subprocess.run(
        [
            str(args.peer_python),
            *wrapper,
            str(PEER_SCRIPT),
            str(args.data),
            str(work / "peer"),
            "--minutes",
            str(args.minutes),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the peer failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "name": "Ultralytics YOLOv8n (peer)",
        "map50": result["map50"],
        "map": result["map50_95"],
        "wall_s": round(time.time() - started, 1),
        "detail": f"{result.get('train_wall_s')} s training, {_peer_epochs(work)} epochs, "
        f"{args.peer_threads or 'Ultralytics default'} thread(s)",
    }


def _peer_epochs(work: Path) -> int | str:
    results = work / "peer" / "runs" / "peer" / "results.csv"
    return len(results.read_text().splitlines()) - 1 if results.is_file() else "?"


def run_ours(name: str, config: dict, work: Path, minutes: float) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = work / f"{name}.json"
    started = time.time()
    done = subprocess.run(
        [
            str(VISIONAUTOML),
            "train",
            str(path),
            "--output-json",
            str(out),
            "--set",
            f"limits.timeout_minutes={minutes}",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.time() - started
    if not out.is_file():
        raise SystemExit(f"{name} failed (exit {done.returncode}): {done.stderr[-3000:]}")
    outcome = json.loads(out.read_text())
    metrics = outcome.get("metrics") or {}
    best = next((t for t in outcome["trials"] if t.get("run_id") == outcome.get("run_id")), {})
    return {
        "name": name,
        "map50": round(float(metrics.get("map_50", 0.0)), 4),
        "map": round(float(metrics.get("map", 0.0)), 4),
        "wall_s": round(wall, 1),
        "detail": f"best: {best.get('params', {}).get('model_name', '?')} ({len(outcome['trials'])} trials, "
        f"{sum(trial['state'] == 'completed' for trial in outcome['trials'])} completed)",
    }


def onnx_speeds(data: Path, work: Path, sweep_dir: Path) -> list[dict]:
    """ms/image of the sweep's trained models (one per model name) through the export and ONNX Runtime.

    Each is exported with the parity check on validation photos (the model's own pre- and
    post-processing in the graph) and timed one image at a time on 20 validation images.
    """
    import numpy as np
    import torch

    from visionautoml.data.formats import read_dataset
    from visionautoml.data.images import decode_image_file
    from visionautoml.deploy.export import export_saved_model
    from visionautoml.deploy.runtime import ExportSettings, OnnxPredictor
    from visionautoml.models.saved import load_model
    from visionautoml.tracking.models import resolve_model

    outcomes = sorted(sweep_dir.glob("sweep (*).json"))
    if not outcomes:
        print(
            f"note: no sweep outcome in {sweep_dir}: the ONNX timings need the sweep's models",
            file=sys.stderr,
        )
        return []
    tracking_uri = f"sqlite:///{sweep_dir / 'ws-sweep' / 'mlflow.db'}"
    torch.set_num_threads(2)
    images = [decode_image_file(record.path) for record in read_dataset(data).sorted().images[::5][:20]]
    rows = []
    for trial in json.loads(outcomes[0].read_text())["trials"]:
        name = trial.get("params", {}).get("model_name")
        if not trial.get("run_id") or not name:
            continue
        folder = resolve_model(
            f"runs:/{trial['run_id']}/model", tracking_uri=tracking_uri, dst=work / "models" / name
        )
        model, spec = load_model(folder)
        out = work / "onnx" / name
        try:
            export_saved_model(
                model, ExportSettings.from_spec(spec), out, images[:4], sample_source="validation"
            )
        except Exception as error:  # report it and time the others
            print(f"note: {name}: {error}", file=sys.stderr)
            continue
        predictor = OnnxPredictor(out, intra_op_threads=2)
        predictor.predict(images[:2])
        timings = []
        for image in images:
            started = time.perf_counter()
            predictor.predict([image])
            timings.append((time.perf_counter() - started) * 1000)
        rows.append(
            {
                "model": name,
                "image_size": spec.image_size,
                "ms_per_image": round(float(np.median(timings)), 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=RACCOON)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "raccoon-yolox.yaml")
    parser.add_argument(
        "--peer-python", type=Path, default=Path.home() / ".venvs" / "peer" / "bin" / "python"
    )
    parser.add_argument(
        "--peer-threads",
        type=int,
        help="torch threads of the peer (default: Ultralytics' own, cpu_count - 1 on a CPU: 1 on 2 cores)",
    )
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-automatic", action="store_true")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument(
        "--sweep-dir",
        type=Path,
        help="an earlier run's work folder whose sweep models to time (with --skip-sweep)",
    )
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no such dataset (the raccoon data lies in ../shared/datasets)")
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    converted = work / "data"
    subprocess.run(
        [
            str(VISIONAUTOML),
            "data",
            "convert",
            str(args.data),
            "--to",
            "jsonl",
            "--out",
            str(converted),
            "--validation-every",
            "5",
        ],
        check=True,
        capture_output=True,
    )
    started = datetime.now(UTC)
    rows = []
    if not args.skip_peer:
        rows.append(run_peer(args, work))
    if not args.skip_sweep:
        sweep = yaml.safe_load(args.config.read_text())
        sweep.update({"training_data": str(converted), "workspace": str(work / "ws-sweep")})
        sweep.pop("validation_data_size", None)
        rows.append(run_ours(f"sweep ({args.config.name})", sweep, work, args.minutes))
    if not args.skip_automatic:
        automatic = {
            "experiment_name": "bench-quality-automatic",
            "workspace": str(work / "ws-automatic"),
            "training_data": str(converted),
            "limits": {"max_trials": 4, "timeout_minutes": args.minutes},
        }
        rows.append(run_ours("automatic mode", automatic, work, args.minutes))
    peer = next((row for row in rows if "peer" in row["name"]), None)
    print(
        f"\n{started:%Y-%m-%d %H:%M} UTC, {MACHINE} ({platform.processor() or platform.machine()}), "
        f"load {os.getloadavg()[0]:.2f}; {args.minutes:g} min each, from scratch, {args.data.name}, "
        "every 5th image to validation\n"
    )
    print("| run | mAP@0.5 | mAP@[.5:.95] | vs peer (mAP@0.5) | wall s | detail |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['map50'] / peer['map50']:.2f}x" if peer and peer["map50"] else "-"
        print(
            f"| {row['name']} | {row['map50']:.4f} | {row['map']:.4f} | {ratio} | {row['wall_s']} "
            f"| {row['detail']} |"
        )
    speeds = [] if args.skip_onnx else onnx_speeds(args.data, work, args.sweep_dir or work)
    if speeds:
        base = next((row["ms_per_image"] for row in speeds if row["model"].startswith("ssdlite")), None)
        print("\n| ONNX Runtime, 2 threads | image_size | ms/image | speed vs ssdlite (above 1: faster) |")
        print("|---|---|---|---|")
        for row in speeds:
            ratio = f"{base / row['ms_per_image']:.2f}x" if base else "-"
            print(f"| {row['model']} | {row['image_size']} | {row['ms_per_image']} | {ratio} |")
    if args.output_json:
        args.output_json.write_text(json.dumps({"runs": rows, "onnx": speeds}, indent=2))


if __name__ == "__main__":
    main()
