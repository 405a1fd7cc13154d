"""Pruned against unpruned tuning: best validation NLL and epochs trained, same seed and trial count.

    python benchmarks/tune_pruning.py [--parts toy bnn] [--trials 20] [--pruners halving hyperband]
        [--data sample_data] [--backbone tv:mobilenet_v2] [--image-size 64] [--epochs 200]
        [--json runs/tune_pruning.json]

``toy``: learning curves whose ranking changes as they converge (the configurations that end best
learn slowest), with noise, searched by the same GP sampler as ``xferkit tune``. ``bnn``:
``xferkit tune --head bnn`` on DATA's features (extracted once, then cached). Each is run without
a pruner, with successive halving and with Hyperband (the epoch as the resource); the ratios are
pruned / unpruned epochs and the pruned best NLL minus the unpruned one.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from xferkit.api.tuning import (
    PRUNERS,
    TrialRecord,
    best_record,
    epoch_pruner,
    open_study,
    run_trials,
    startup_trials,
    trial_records,
    tune,
)
from xferkit.model.options import BackboneOptions

#: Epochs of the toy learning curves (rungs of the pruners at 3, 9 and 27).
TOY_EPOCHS = 81


def toy_space(trial) -> dict:
    return {"x": trial.suggest_float("x", -5.0, 5.0), "y": trial.suggest_float("y", -5.0, 5.0)}


def toy_curve(params: dict, epoch_end) -> tuple[float, float]:
    """Final NLL: a bowl at (1.3, -0.7); the nearer x is to 1.3, the slower the curve gets there."""
    x, y = params["x"], params["y"]
    final = 0.1 + 0.05 * ((x - 1.3) ** 2 + (y + 0.7) ** 2)
    slowness = 1.0 + 3.0 * math.exp(-abs(x - 1.3))
    noise = np.random.default_rng(abs(hash((round(x, 9), round(y, 9)))) % 2**32)
    for epoch in range(1, TOY_EPOCHS + 1):
        value = final + slowness / epoch + noise.normal(0, 0.01)
        if epoch_end(epoch, value):
            break
    return value, 0.0


def toy_run(folder: Path, pruner: str | None, trials: int, seed: int) -> list[TrialRecord]:
    study = open_study(folder, {"toy": "curves"}, seed, startup_trials(trials),
                       epoch_pruner(pruner, TOY_EPOCHS) if pruner else None)
    run_trials(study, toy_curve, toy_space, trials)
    return trial_records(study)


def bnn_run(folder: Path, pruner: str | None, args) -> list[TrialRecord]:
    return tune(args.data, backbone=BackboneOptions(args.backbone, image_size=args.image_size), head="bnn",
                output=folder, trials=args.trials, head_params={"epochs": args.epochs}, seed=args.seed,
                pruner=pruner).trials


def summary(records: list[TrialRecord], seconds: float) -> dict:
    best = best_record(records)
    return {"best_val_nll": round(best.val_nll, 4), "best_trial": best.number,
            "epochs": sum(r.epochs or 0 for r in records),
            "pruned": sum(r.state == "pruned" for r in records), "trials": len(records),
            "seconds": round(seconds, 1)}


def compare(run, trials_name: str, pruners: list[str]) -> dict:
    """*run(folder, pruner)* without a pruner and with each of *pruners*; ratios against no pruner."""
    arms = {}
    for pruner in (None, *pruners):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            arms[pruner or "none"] = summary(run(Path(tmp) / "tune", pruner), time.perf_counter() - start)
        print(f"{trials_name:>4} {pruner or 'none':>9}: {json.dumps(arms[pruner or 'none'])}", flush=True)
    base = arms["none"]
    for pruner in pruners:
        arm = arms[pruner]
        arm["epochs_ratio"] = round(arm["epochs"] / base["epochs"], 3)
        arm["best_nll_minus_unpruned"] = round(arm["best_val_nll"] - base["best_val_nll"], 4)
        print(f"{trials_name:>4} {pruner:>9}: epochs {arm['epochs']}/{base['epochs']} = "
              f"{arm['epochs_ratio']:.2f}, best val NLL {arm['best_val_nll']:.4f} vs "
              f"{base['best_val_nll']:.4f} ({arm['best_nll_minus_unpruned']:+.4f})")
    return arms


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("toy", "bnn"), default=["toy", "bnn"])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="sample_data")
    parser.add_argument("--backbone", default="tv:mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=200, help="bnn's epochs (the pruners' full resource)")
    parser.add_argument("--pruners", nargs="+", choices=PRUNERS, default=list(PRUNERS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = {"trials": args.trials, "seed": args.seed, "bnn_epochs": args.epochs}
    if "toy" in args.parts:
        result["toy"] = compare(lambda folder, pruner: toy_run(folder, pruner, args.trials, args.seed), "toy",
                                args.pruners)
    if "bnn" in args.parts:
        result["bnn"] = compare(lambda folder, pruner: bnn_run(folder, pruner, args), "bnn", args.pruners)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
