"""Pruned against unpruned tuning: best validation NLL and epochs trained, same seed and ``--trials``.

    python benchmarks/tune_pruning.py [--parts toy bnn finetune scratch] [--trials 20] [--seeds 0 1 2]
        [--arms none/gp halving/gp hyperband/gp hyperband/tpe] [--data sample_data]
        [--backbone tv:mobilenet_v2] [--no-pretrained] [--image-size 64] [--epochs 200] [--pixel-epochs 9]
        [--json runs/tune_pruning.json]

``toy``: learning curves whose ranking changes as they converge (the configurations that end best
learn slowest), with noise. ``bnn``, ``finetune``, ``scratch``: ``xferkit tune --head HEAD`` on DATA
(bnn on features, extracted once, then cached). Each arm is a pruner (``none``, ``halving``,
``hyperband``; the epoch as the resource) and a sampler (``gp``, ``tpe``); the first arm is the
reference (``none/gp``: ``tune --no-prune``, ``--trials`` trials). A pruned arm runs trials until it has
spent ``PRUNED_SHARE`` of the reference's epochs, as ``tune`` does. Per seed, each arm's epochs over the
reference's and its best NLL minus the reference's; the target is a ratio <= 0.5 and a difference <= 0.
``--json`` also records every trial (parameters, state, epochs, NLL), to see which ones pruning lost.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xferkit.api.tuning import (
    PRUNED_SHARE,
    EpochBudget,
    TrialRecord,
    best_record,
    epoch_pruner,
    open_study,
    run_trials,
    startup_trials,
    trial_records,
    tune,
)
from xferkit.model.options import BackboneOptions, ExtractOptions

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


def toy_run(folder: Path, arm: Arm, trials: int, seed: int) -> list[TrialRecord]:
    study = open_study(folder, {"toy": "curves"}, seed, startup_trials(trials),
                       epoch_pruner(arm.pruner, TOY_EPOCHS) if arm.pruner else None, arm.sampler)
    budget = EpochBudget(int(trials * TOY_EPOCHS * PRUNED_SHARE), TOY_EPOCHS) if arm.pruner else None
    run_trials(study, toy_curve, toy_space, trials, budget=budget)
    return trial_records(study)


def head_run(folder: Path, arm: Arm, head: str, seed: int, args) -> list[TrialRecord]:
    """``xferkit tune --head HEAD`` on DATA (a pixel trainer runs ``--pixel-epochs``, bnn ``--epochs``)."""
    epochs = args.epochs if head == "bnn" else args.pixel_epochs
    backbone = BackboneOptions(args.backbone, pretrained=args.pretrained, image_size=args.image_size)
    return tune(args.data, backbone=backbone, head=head, output=folder, trials=args.trials,
                head_params={"epochs": epochs}, seed=seed, pruner=arm.pruner, sampler=arm.sampler,
                options=ExtractOptions(workers=0)).trials


@dataclass(frozen=True)
class Arm:
    """A way to tune, ``PRUNER/SAMPLER``: a pruner (``none``: none) and a sampler of ``SAMPLERS``."""

    name: str

    @property
    def pruner(self) -> str | None:
        return None if self.name.split("/")[0] == "none" else self.name.split("/")[0]

    @property
    def sampler(self) -> str:
        return self.name.split("/")[1]


def summary(records: list[TrialRecord], seconds: float) -> dict:
    best = best_record(records)
    return {"best_val_nll": round(best.val_nll, 4), "best_trial": best.number,
            "epochs": sum(r.epochs or 0 for r in records),
            "pruned": sum(r.state == "pruned" for r in records), "trials": len(records),
            "seconds": round(seconds, 1)}


def compare(run, part: str, arms: list[Arm], seeds: list[int]) -> dict:
    """*run(folder, arm, seed)* for each seed and arm; ratios against the first arm (the reference)."""
    results = {}
    for seed in seeds:
        rows = results[str(seed)] = {}
        for arm in arms:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                records = run(Path(tmp) / "tune", arm, seed)
                rows[arm.name] = summary(records, time.perf_counter() - start)
            base, row = rows[arms[0].name], rows[arm.name]
            row["epochs_ratio"] = round(row["epochs"] / base["epochs"], 3)
            row["best_nll_minus_reference"] = round(row["best_val_nll"] - base["best_val_nll"], 4)
            row["meets_target"] = row["epochs_ratio"] <= 0.5 and row["best_nll_minus_reference"] <= 0
            print(f"{part} seed {seed} {arm.name:>20}: {json.dumps(row)}", flush=True)
            row["trial_records"] = [asdict(r) for r in records]
    print(f"| {part} | seed | arm | best val NLL | minus ref. | epochs | ratio | trials (pruned) | target |")
    for seed, rows in results.items():
        for name, row in rows.items():
            target = "reference" if name == arms[0].name else "met" if row["meets_target"] else "missed"
            print(f"| {part} | {seed} | {name} | {row['best_val_nll']:.4f} "
                  f"| {row['best_nll_minus_reference']:+.4f} | {row['epochs']} | {row['epochs_ratio']:.2f} "
                  f"| {row['trials']} ({row['pruned']}) | {target} |")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("toy", "bnn", "finetune", "scratch"),
                        default=["toy", "bnn"])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data", default="sample_data")
    parser.add_argument("--backbone", default="tv:mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="random backbone weights (a tiny test backbone has none to load)")
    parser.add_argument("--epochs", type=int, default=200, help="bnn's epochs (the pruners' full resource)")
    parser.add_argument("--pixel-epochs", type=int, default=9, help="finetune's and scratch's epochs")
    parser.add_argument("--arms", nargs="+", type=Arm, default=[Arm(a) for a in ARMS],
                        help="PRUNER/SAMPLER; the first is the reference")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = {"trials": args.trials, "seeds": args.seeds, "bnn_epochs": args.epochs,
              "pixel_epochs": args.pixel_epochs,
              "arms": [a.name for a in args.arms]}
    if "toy" in args.parts:
        result["toy"] = compare(lambda folder, arm, seed: toy_run(folder, arm, args.trials, seed), "toy",
                                args.arms, args.seeds)
    for head in set(args.parts) & {"bnn", "finetune", "scratch"}:
        result[head] = compare(lambda folder, arm, seed, head=head: head_run(folder, arm, head, seed, args),
                               head, args.arms, args.seeds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


#: The reference (how ``tune --no-prune`` runs) and the pruned ways to tune that are compared with it.
ARMS = ("none/gp", "halving/gp", "hyperband/gp", "hyperband/tpe")

if __name__ == "__main__":
    main()
