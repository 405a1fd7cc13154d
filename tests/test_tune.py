"""`xferkit tune`: the GP sampler improves on its random start, trials resume, the pruner stops poor
learning curves early, the best model is saved."""

import csv
import json

import numpy as np
import optuna
import pytest
from conftest import TINY_BACKBONE, run_cli, write_image_folder
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from xferkit.api import ExtractOptions, predict
from xferkit.api.tuning import (
    JOURNAL,
    PRUNED_SHARE,
    PRUNER,
    PRUNERS,
    REDUCTION,
    STUDY,
    EpochBudget,
    TrialRecord,
    best_record,
    epoch_pruner,
    epochs_note,
    open_study,
    run_trials,
    startup_trials,
    trial_records,
    trials_csv,
)
from xferkit.core.errors import XferkitError
from xferkit.core.metrics import negative_log_likelihood
from xferkit.finetune import FinetuneClassifier
from xferkit.heads.bnn import BNNHead
from xferkit.model import load_model

TINY = ["--backbone", TINY_BACKBONE, "--no-pretrained", "--image-size", "32", "--workers", "0"]


def space(trial) -> dict:
    return {"x": trial.suggest_float("x", -5.0, 5.0), "y": trial.suggest_float("y", -5.0, 5.0)}


def bowl(params: dict, epoch_end=None) -> tuple[float, float]:
    """A toy objective with its minimum at (1.3, -0.7); 'accuracy' is unused here."""
    return (params["x"] - 1.3) ** 2 + (params["y"] + 0.7) ** 2, 0.0


#: Epochs of the toy learning curves.
EPOCHS = 9


def toy_curve(params: dict, epoch_end, epochs: int = EPOCHS) -> tuple[float, float]:
    """The bowl approached as 1/epoch: a trial's rank at any epoch is its final one; stops when told."""
    for epoch in range(1, epochs + 1):
        value = bowl(params)[0] + 3.0 / epoch
        if epoch_end(epoch, value):
            break
    return value, 0.0


def tuned(folder, pruner, trials: int = 12) -> list[TrialRecord]:
    """Random trials (all start-up: the same ones with and without *pruner*), read back from the journal."""
    run_trials(open_study(folder, {"toy": "curve"}, seed=0, n_startup=trials, pruner=pruner), toy_curve,
               space, trials)
    return trial_records(open_study(folder, {"toy": "curve"}))  # as a resumed run reads it


def test_gp_sampler_improves_on_its_random_start(tmp_path):
    study = open_study(tmp_path, {"toy": "bowl"}, seed=0, n_startup=5)
    run_trials(study, bowl, space, 14)
    values = [r.val_nll for r in trial_records(study)]
    assert len(values) == 14
    assert min(values[5:]) < 0.5 * min(values[:5]), values


def test_resume_runs_only_the_missing_trials(tmp_path):
    calls = []

    def counted(params, epoch_end=None):
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
    assert model.held_out.source == "5-fold cross-fitting on the training images"  # calibrated, held out
    predictions = predict(model, [data / "blue" / "1.png"], options=ExtractOptions(workers=0))
    assert predictions.predictions[0].label == "blue"

    resumed = json.loads(run_cli("tune", data, "--head", "lr", "--trials", "4", "-o", out, *TINY,
                             "--json").stdout)
    assert resumed["trials"][:3] == report["trials"] and len(resumed["trials"]) == 4


def test_pruned_tuning_runs_fewer_epochs_and_records_pruned_trials(tmp_path):
    full = tuned(tmp_path / "full", None)
    pruned = tuned(tmp_path / "pruned", epoch_pruner("halving", EPOCHS))
    assert all(r.state == "complete" and r.epochs == EPOCHS for r in full)
    assert len(pruned) == 12
    stopped = [r for r in pruned if r.state == "pruned"]
    assert stopped and all(r.epochs < EPOCHS for r in stopped)
    assert sum(r.epochs for r in pruned) <= 0.5 * sum(r.epochs for r in full)
    assert [r.params for r in pruned] == [r.params for r in full]
    best = best_record(pruned)  # the best curve leads at every rung: it is never pruned
    assert (best.number, best.val_nll) == (best_record(full).number, best_record(full).val_nll)
    rows = list(csv.DictReader(trials_csv(pruned).splitlines()))
    assert [(row["state"], int(row["epochs"])) for row in rows] == [(r.state, r.epochs) for r in pruned]
    ran = sum(r.epochs for r in pruned)
    assert epochs_note(pruned, 12, EPOCHS, "gp") == (
        f"{len(stopped)} of 12 trials pruned (the gp sampler learned each where it stopped); the trials "
        f"trained {ran} epochs, {ran / 108:.0%} of 12 x 9")


def test_a_pruned_study_spends_its_epoch_budget_on_more_trials(tmp_path):
    budget = EpochBudget(total=6 * EPOCHS, per_trial=EPOCHS)

    def run() -> list[TrialRecord]:
        study = open_study(tmp_path, {"toy": "curve"}, seed=0, n_startup=100,
                           pruner=epoch_pruner("halving", EPOCHS))
        run_trials(study, toy_curve, space, 6, budget=budget)
        return trial_records(study)

    records = run()
    spent = sum(r.epochs for r in records)
    assert any(r.state == "pruned" for r in records) and len(records) > 6  # the pruned epochs bought trials
    assert spent <= budget.total < spent + EPOCHS  # stopped when one more full trial would overrun it
    assert run() == records  # resumed: the budget is spent, nothing more runs


#: How much higher pruned tuning's best toy NLL may end than unpruned tuning's (the toy's NLL spans
#: 0.33 to 72; a GP blind to pruned trials ended 1.4 higher, a random search).
TOLERANCE = 0.05


@pytest.mark.slow  # two GP searches of 12 trials: 5.5 s
def test_pruned_tuning_runs_fewer_epochs_and_keeps_the_best_nll(tmp_path):
    """``tune``'s pruner, the GP learning where pruned trials stopped, against the unpruned GP (same seed)."""
    def run(folder, pruner):
        study = open_study(folder, {"toy": "curve"}, seed=0, n_startup=startup_trials(12), pruner=pruner)
        run_trials(study, toy_curve, space, 12)
        return study, trial_records(study)

    _, full = run(tmp_path / "full", None)
    study, pruned = run(tmp_path / "pruned", epoch_pruner(PRUNER, EPOCHS))
    assert isinstance(study.sampler, optuna.samplers.GPSampler)
    stopped = [t for t in study.trials if t.user_attrs["pruned"]]
    assert stopped and all(t.state == TrialState.COMPLETE for t in stopped)  # so the GP learns from them
    assert sum(r.epochs for r in pruned) <= 0.75 * sum(r.epochs for r in full)
    assert best_record(pruned).val_nll <= best_record(full).val_nll + TOLERANCE


def test_a_resumed_study_keeps_its_sampler(tmp_path):
    assert isinstance(open_study(tmp_path, {"toy": "tpe"}, sampler="tpe").sampler, optuna.samplers.TPESampler)
    assert isinstance(open_study(tmp_path, {"toy": "tpe"}).sampler, optuna.samplers.TPESampler)
    with pytest.raises(XferkitError, match="unknown sampler"):
        open_study(tmp_path / "new", {"toy": "x"}, sampler="cmaes")
    assert open_study(tmp_path / "new", {"toy": "x"}).user_attrs["sampler"] == "gp"  # refused: unrecorded


def test_hyperband_prunes_too(tmp_path):
    records = tuned(tmp_path, epoch_pruner("hyperband", EPOCHS))
    assert any(r.state == "pruned" for r in records)
    with pytest.raises(XferkitError, match="unknown pruner"):
        epoch_pruner("median", EPOCHS)


class SeenTrials(optuna.samplers.RandomSampler):
    """A random sampler that records how many trials it is shown before each draw."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.seen: list[int] = []

    def sample_independent(self, study, trial, name, distribution):
        self.seen.append(len(study.get_trials(deepcopy=False)))
        return super().sample_independent(study, trial, name, distribution)


def test_the_pruners_stop_no_trial_late_and_hide_no_trial_from_the_sampler(tmp_path):
    epochs = 3 * EPOCHS
    for name in PRUNERS:
        study = open_study(tmp_path / name, {"toy": name}, pruner=epoch_pruner(name, epochs))
        study.sampler = sampler = SeenTrials(seed=0)
        run_trials(study, lambda params, epoch_end: toy_curve(params, epoch_end, epochs), space, 24)
        stopped = [r.epochs for r in trial_records(study) if r.state == "pruned"]
        assert stopped and max(stopped) <= epochs // REDUCTION  # a rung near the end would waste a trial
        assert sampler.seen[-1] == 24  # Hyperband's samplers would see only the trials of one bracket


def test_bnn_epoch_callback_hears_validation_nll_and_stops_training():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(90, 5)).astype(np.float32), np.repeat(["a", "b", "c"], 30)
    X[:, 0] += 3 * (y == "a")
    heard = []

    def stop_after_four(epoch, val_nll):
        heard.append((epoch, val_nll))
        return epoch == 4

    trained = []
    head = BNNHead(epochs=50, random_state=0).fit(X[::2], y[::2], progress=lambda e, *_: trained.append(e),
                                                  epoch_end=stop_after_four, validation=(X[1::2], y[1::2]))
    assert [epoch for epoch, _ in heard] == trained == [1, 2, 3, 4]
    index = np.searchsorted(head.classes_, y[1::2])  # a few weight draws: near the predictive's NLL
    assert heard[-1][1] == pytest.approx(negative_log_likelihood(index, head.predict_proba(X[1::2])), rel=0.1)
    with pytest.raises(XferkitError, match="validation"):
        BNNHead(epochs=2).fit(X, y, epoch_end=stop_after_four)


def test_finetune_epoch_callback_stops_training(tmp_path):
    paths = sorted(write_image_folder(tmp_path, per_class=6).rglob("*.png"))
    heard = []
    trainer = FinetuneClassifier(backbone=TINY_BACKBONE, pretrained=False, image_size=32, workers=0,
                                 epochs=6, random_state=0)
    trainer.fit(paths, [p.parent.name for p in paths], epoch_end=lambda e, nll: heard.append(nll) or e == 2)
    assert len(heard) == 2 and all(np.isfinite(heard))
    assert trainer.history_["epochs_run"] == 2 and trainer.history_["stopped"] == "epoch_end"


def test_tune_cli_records_each_trials_epochs_and_resumes_with_the_pruner(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=10)
    out, bnn = tmp_path / "tuned", ["--head", "bnn", "--set", "epochs=9", "-o", tmp_path / "tuned", *TINY]
    report = json.loads(run_cli("tune", data, "--trials", "2", "--no-prune", *bnn, "--json").stdout)
    assert [(t["state"], t["epochs"]) for t in report["trials"]] == [("complete", 9)] * 2
    assert "0 of 2 trials pruned; the trials trained 18 epochs" in " ".join(report["notes"])
    resumed = json.loads(run_cli("tune", data, "--trials", "6", *bnn, "--json").stdout)
    assert resumed["trials"][:2] == report["trials"] and len(resumed["trials"]) >= 3
    assert sum(t["epochs"] for t in resumed["trials"]) <= 6 * 9 * PRUNED_SHARE  # the 2 unpruned count too
    assert all(t["epochs"] == 9 if t["state"] == "complete" else t["state"] == "pruned" and t["epochs"] < 9
               for t in resumed["trials"])
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["state"], int(r["epochs"])) for r in rows] == [(t["state"], t["epochs"])
                                                             for t in resumed["trials"]]
    journal = JournalStorage(JournalFileBackend(str(out / JOURNAL)))
    study = optuna.load_study(study_name=STUDY, storage=journal)
    assert study.user_attrs["sampler"] == "gp"  # it learns from every trial, a pruned one where it stopped
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * len(resumed["trials"])
    assert [t.value for t in study.trials] == [t["val_nll"] for t in resumed["trials"]]
