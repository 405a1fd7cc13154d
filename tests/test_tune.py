"""`xferkit tune`: the GP sampler improves on its random start, trials resume, the best model is saved."""

import csv
import json

import pytest
from conftest import TINY_BACKBONE, run_cli, write_image_folder

from xferkit.api import ExtractOptions, predict
from xferkit.api.tuning import TrialRecord, best_record, open_study, run_trials, trial_records
from xferkit.core.errors import XferkitError
from xferkit.model import load_model

TINY = ["--backbone", TINY_BACKBONE, "--no-pretrained", "--image-size", "32", "--workers", "0"]


def space(trial) -> dict:
    return {"x": trial.suggest_float("x", -5.0, 5.0), "y": trial.suggest_float("y", -5.0, 5.0)}


def bowl(params: dict) -> tuple[float, float]:
    """A toy objective with its minimum at (1.3, -0.7); 'accuracy' is unused here."""
    return (params["x"] - 1.3) ** 2 + (params["y"] + 0.7) ** 2, 0.0


def test_gp_sampler_improves_on_its_random_start(tmp_path):
    study = open_study(tmp_path, {"toy": "bowl"}, seed=0, n_startup=5)
    run_trials(study, bowl, space, 14)
    values = [r.val_nll for r in trial_records(study)]
    assert len(values) == 14
    assert min(values[5:]) < 0.5 * min(values[:5]), values


def test_resume_runs_only_the_missing_trials(tmp_path):
    calls = []

    def counted(params):
        calls.append(params)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the fifth trial
        if params["x"] > 4.0:
            raise ValueError("diverged")  # a failed trial is recorded, not retried
        return bowl(params)

    config = {"toy": "counted"}
    run_trials(open_study(tmp_path, config, n_startup=3), counted, space, 4)
    first = trial_records(open_study(tmp_path, config))
    with pytest.raises(KeyboardInterrupt):
        run_trials(open_study(tmp_path, config, n_startup=3), counted, space, 7)
    study = open_study(tmp_path, config, n_startup=3)  # a new process would start here
    run_trials(study, counted, space, 7)
    records = trial_records(study)
    assert len(calls) == 4 + 1 + 3  # four recorded, one interrupted, three to reach seven
    assert len(records) == 7 and records[:4] == first
    run_trials(open_study(tmp_path, config), counted, space, 7)
    assert len(calls) == 8  # nothing left to run
    with pytest.raises(XferkitError, match="different tune"):
        open_study(tmp_path, {"toy": "another"})


def test_best_trial_breaks_nll_ties_by_accuracy():
    records = [TrialRecord(0, {}, 0.30001, 0.80, 1.0), TrialRecord(1, {}, 0.30003, 0.90, 1.0),
               TrialRecord(2, {}, 0.5, 0.99, 1.0), TrialRecord(3, {}, None, None, 1.0, "failed")]
    assert best_record(records).number == 1


def test_tune_cli_saves_trials_plot_and_the_refitted_best_model(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=10)
    out = tmp_path / "tuned"
    report = json.loads(run_cli("tune", data, "--head", "lr", "--trials", "3", "-o", out, *TINY,
                            "--json").stdout)
    assert [t["number"] for t in report["trials"]] == [0, 1, 2]
    assert report["best"]["val_nll"] == min(t["val_nll"] for t in report["trials"])
    assert report["baseline_default_params"]["nll"] >= 0
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["C"]) for r in rows] == [t["params"]["C"] for t in report["trials"]]
    assert (out / "best_so_far.png").read_bytes().startswith(b"\x89PNG")
    model = load_model(out / "model")
    assert model.estimator.C == report["best"]["params"]["C"] and model.info["n_train"] == 30
    predictions = predict(model, [data / "blue" / "1.png"], options=ExtractOptions(workers=0))
    assert predictions.predictions[0].label == "blue"

    resumed = json.loads(run_cli("tune", data, "--head", "lr", "--trials", "4", "-o", out, *TINY,
                             "--json").stdout)
    assert resumed["trials"][:3] == report["trials"] and len(resumed["trials"]) == 4
